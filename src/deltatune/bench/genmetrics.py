"""Generation metrics (BLEU, ROUGE-L, exact match) on the 0-1 scale; reports show them x100.

BLEU and ROUGE-L come from sacrebleu and rouge-score, so numbers match what papers report;
only the input checks and the multi-reference plumbing live here.

Every input has its own list of references, of any length >= 1 (E2E NLG has 1..~40). sacrebleu
takes references as *streams* (stream k holds the k-th reference of every input), so inputs with
fewer references are padded with ``None``, which sacrebleu drops per segment (an empty string
would instead count as a real, empty reference and change the brevity penalty).
"""
from __future__ import annotations

from collections.abc import Sequence

from ..errors import ConfigError


def _check(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> None:
    """Refuse inputs the libraries would silently mis-score (a str as refs is a list of chars)."""
    if len(hyps) == 0:
        raise ConfigError("no hypotheses to score: pass at least one generated text.")
    if len(hyps) != len(refs):
        raise ConfigError(f"{len(hyps)} hypotheses but {len(refs)} reference lists: "
                          "pass one list of references per hypothesis.")
    for i, (h, r) in enumerate(zip(hyps, refs)):
        if not isinstance(h, str):
            raise ConfigError(f"hypothesis {i} is a {type(h).__name__}, not a str.")
        if isinstance(r, str):
            raise ConfigError(f"references of input {i} are a str: wrap them in a list, [{r[:30]!r}].")
        if len(r) == 0:
            raise ConfigError(f"input {i} has no references: each input needs at least one.")
        if not all(isinstance(x, str) for x in r):
            raise ConfigError(f"references of input {i} must all be str.")


def _streams(refs: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Per-input reference lists -> sacrebleu's reference streams, short ones padded with None."""
    width = max(len(r) for r in refs)
    return [[r[k] if k < len(r) else None for r in refs] for k in range(width)]


def bleu(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, exp smoothing), multi-reference, 0-1."""
    from sacrebleu.metrics import BLEU

    _check(hyps, refs)
    return BLEU(tokenize="13a").corpus_score(list(hyps), _streams(refs)).score / 100.0


def rouge_l(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Mean over inputs of ROUGE-L F1 against the best-matching reference (rouge-score), 0-1."""
    from rouge_score.rouge_scorer import RougeScorer

    _check(hyps, refs)
    scorer = RougeScorer(["rougeL"], use_stemmer=False)
    return sum(scorer.score_multi(list(r), h)["rougeL"].fmeasure for h, r in zip(hyps, refs)) / len(hyps)


def _norm(text: str) -> str:
    return " ".join(text.split())


def exact_match(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Fraction of hypotheses equal to any of their references, up to whitespace."""
    _check(hyps, refs)
    return sum(_norm(h) in {_norm(x) for x in r} for h, r in zip(hyps, refs)) / len(hyps)


def generation_scores(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> dict[str, float]:
    """All generation metrics at once, keyed as in reports."""
    return {"bleu": bleu(hyps, refs), "rougeL": rouge_l(hyps, refs), "exact_match": exact_match(hyps, refs)}
