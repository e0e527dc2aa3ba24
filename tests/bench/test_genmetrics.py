"""Generation metrics agree with sacrebleu / rouge-score themselves, incl. variable reference counts."""
import pytest
import sacrebleu
from rouge_score.rouge_scorer import RougeScorer

from deltatune.bench.genmetrics import bleu, exact_match, generation_scores, rouge_l
from deltatune.errors import ConfigError

HYPS = [
    "The Eagle is a cheap coffee shop near Burger King.",
    "Green Man serves Italian food in the city centre.",
    "Aromi is a family friendly pub.",
    "There is a restaurant.",
]
REFS = [  # 3, 1, 2 and 4 references: E2E-style varying counts
    ["The Eagle is a cheap coffee shop located near Burger King.",
     "Near Burger King is a low priced coffee shop called The Eagle.",
     "The Eagle coffee shop is cheap and near Burger King."],
    ["The Green Man serves Italian food in the city centre."],
    ["Aromi is a pub that is family friendly.", "Aromi, a family-friendly pub."],
    ["A restaurant exists.", "There is one restaurant here.", "It is a restaurant.", "Restaurant."],
]


def streams(refs):
    """sacrebleu's own multi-reference layout, built by hand: stream k = k-th refs, None padded."""
    width = max(map(len, refs))
    return [[r[k] if k < len(r) else None for r in refs] for k in range(width)]


def test_bleu_equals_sacrebleu_with_varying_reference_counts():
    want = sacrebleu.corpus_bleu(HYPS, streams(REFS)).score / 100
    assert 0.2 < want < 1.0
    assert bleu(HYPS, REFS) == pytest.approx(want, abs=1e-9)


def test_bleu_equals_sacrebleu_single_reference():
    refs = [[r[0]] for r in REFS]
    want = sacrebleu.corpus_bleu(HYPS, [[r[0] for r in refs]]).score / 100
    assert bleu(HYPS, refs) == pytest.approx(want, abs=1e-9)


def test_bleu_missing_reference_is_not_an_empty_reference():
    # an empty-string pad would be the "closest" reference length to a 1-word output, dropping
    # the brevity penalty; None padding keeps it
    hyps, refs = ["the", "a dog runs fast"], [["the cat sat on"], ["a dog runs quickly", "a dog runs fast"]]
    assert bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, streams(refs)).score / 100, abs=1e-9)
    assert bleu(hyps, refs) < 0.6


def test_bleu_hand_checkable():
    assert bleu(HYPS, [[h] for h in HYPS]) == pytest.approx(1.0, abs=1e-9)
    assert bleu(["alpha beta gamma delta"], [["one two three four"]]) == 0.0


def test_rouge_l_is_best_reference_mean():
    scorer = RougeScorer(["rougeL"], use_stemmer=False)
    best = [max(scorer.score(r, h)["rougeL"].fmeasure for r in refs) for h, refs in zip(HYPS, REFS)]
    assert rouge_l(HYPS, REFS) == pytest.approx(sum(best) / len(best), abs=1e-12)
    # hand-checkable: LCS "the cat on the mat" = 5 of 6 tokens each side -> F = 5/6 (the "x" ref scores 0)
    assert rouge_l(["the cat sat on the mat"], [["the cat lay on the mat", "x"]]) == pytest.approx(5 / 6)
    assert rouge_l(["the cat was found under the bed"], [["the cat was under the bed"]]) == pytest.approx(
        2 * (6 / 7) * 1.0 / (6 / 7 + 1.0))


def test_exact_match_normalises_whitespace_only():
    hyps = ["  The  Eagle is\tcheap ", "the eagle is cheap", "no", "b"]
    refs = [["The Eagle is cheap"], ["The Eagle is cheap"], ["yes", "no"], ["a"]]
    assert exact_match(hyps, refs) == 0.5


def test_generation_scores_keys():
    scores = generation_scores(HYPS, REFS)
    assert set(scores) == {"bleu", "rougeL", "exact_match"}
    assert scores["bleu"] == bleu(HYPS, REFS) and scores["exact_match"] == 0.0


@pytest.mark.parametrize("hyps, refs, words", [
    (["a", "b"], [["a"]], "2 hypotheses but 1"),
    ([], [], "no hypotheses"),
    (["a", "b"], [["a"], []], "input 1 has no references"),
    (["a"], ["a"], "wrap them in a list"),
    ([None], [["a"]], "hypothesis 0"),
])
def test_bad_inputs_are_refused(hyps, refs, words):
    for fn in (bleu, rouge_l, exact_match, generation_scores):
        with pytest.raises(ConfigError, match=words):
            fn(hyps, refs)
