"""Generation tasks: encoding (completion-only loss, chat turns, truncation, packing), task
mappings and refusals, dev loss, and each task kind through the CLI on tiny models."""
import json
import math

import pytest
import torch

from deltatune.bench.gendata import (IGNORE, LMCollator, check_packing, encode_causal, encode_seq2seq,
                                     pack, prompt_ids)
from deltatune.bench.genscore import dev_loss, gen_dev
from deltatune.bench.models import load_model
from deltatune.bench.tasks import GenExamples, Task, get_task, parse_task
from deltatune.cli import main
from deltatune.core.model import DeltaModel
from deltatune.errors import ConfigError
from deltatune.models import tiny_model, tiny_tokenizer

QA = [("What is 2+2?", "4"), ("Capital of France?", "Paris"), ("Color of the sky?", "blue"),
      ("Opposite of hot?", "cold"), ("Plural of cat?", "cats"), ("First letter?", "a")]


def gen_task(kind="causal_lm", template="Q: {}\nA:"):
    return Task("t", lambda split, d: None, 0, "bleu", ("bleu",), kind=kind, template=template)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def qa_files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"q": q, "a": a} for q, a in QA * 6])
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"q": q, "a": a} for q, a in QA])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"m": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                                                 for q, a in QA * 3])
    return train, dev, chat


# -- encoding ---------------------------------------------------------------------------------------
def test_completion_only_loss_masks_exactly_the_prompt():
    tok, task = tiny_tokenizer(), gen_task()
    ex = GenExamples(["hello?", "a longer question?"], ["yes", "no way"])
    enc = encode_causal(tok, task, ex, max_length=100)
    for f, p, c in zip(enc.features, ex.prompts, ex.completions):
        n_prompt = len(tok(f"Q: {p}\nA:")["input_ids"])
        n_comp = len(tok(c, add_special_tokens=False)["input_ids"]) + 1  # + eos
        assert len(f["input_ids"]) == n_prompt + n_comp
        assert f["labels"][:n_prompt] == [IGNORE] * n_prompt
        assert f["labels"][n_prompt:] == f["input_ids"][n_prompt:]
        assert f["input_ids"][-1] == tok.eos_token_id
        assert tok.decode(f["input_ids"][n_prompt:-1]) == c
    everything = encode_causal(tok, task, ex, max_length=100, loss_on_prompt=True)
    assert all(f["labels"] == f["input_ids"] for f in everything.features)


def test_long_prompts_lose_their_left_end_and_are_counted():
    tok, task = tiny_tokenizer(), gen_task(template="{}")
    ex = GenExamples(["x" * 50 + "END", "short"], ["answer", "ok"])
    enc = encode_causal(tok, task, ex, max_length=20)
    f = enc.features[0]
    assert len(f["input_ids"]) == 20 and tok.decode(f["input_ids"]).endswith("ENDanswer</s>")
    assert f["labels"].count(IGNORE) == 20 - 7  # the completion (6 bytes + eos) is whole
    assert enc.notes == {"prompts_truncated": 1}
    long_completion = encode_causal(tok, task, GenExamples(["p"], ["y" * 40]), max_length=20)
    assert long_completion.notes == {"completions_truncated": 1}
    assert len(long_completion.features[0]["input_ids"]) == 20 and long_completion.features[0]["input_ids"][0] == tok.encode("p")[0]


def test_chat_rendering_equals_the_template_and_loss_is_on_assistant_turns():
    tok = tiny_tokenizer()
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    enc = encode_causal(tok, gen_task(), GenExamples([turns], ["4"]), max_length=200)
    ids, labels = enc.features[0]["input_ids"], enc.features[0]["labels"]
    expected = tok.apply_chat_template(turns, tokenize=True)
    expected = expected if isinstance(expected, list) else expected["input_ids"]
    assert ids == list(expected)
    trained = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])
    assert trained == "hello\n4\n"  # the assistant contents with the template's end-of-turn newline
    gen = prompt_ids(tok, gen_task(), turns)
    assert tok.decode(gen).endswith("<|user|>\n2+2?\n<|assistant|>\n")


def test_chat_needs_a_chat_template():
    tok = tiny_tokenizer(chat_template=False)
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(ConfigError, match="no chat template.*prompt=COL,completion=COL"):
        encode_causal(tok, gen_task(), GenExamples([turns], ["yo"]), max_length=50)


def test_seq2seq_encoding():
    tok = tiny_tokenizer()
    enc = encode_seq2seq(tok, gen_task("seq2seq", "{}"), GenExamples(["source text"], ["target"]), 64)
    f = enc.features[0]
    assert tok.decode(f["input_ids"]) == "source text" and f["labels"][-1] == tok.eos_token_id
    assert tok.decode(f["labels"][:-1]) == "target"


def test_packing_restarts_positions_and_keeps_examples_apart():
    tok = tiny_tokenizer()
    enc = encode_causal(tok, gen_task(template="{}"), GenExamples(["ab", "cde", "f"], ["1", "22", "3"]), 64)
    packed = pack(enc, rows=2, max_length=16, seed=0)
    row = packed.features[0]
    assert len(row["input_ids"]) <= 16 and packed.packed
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    assert len(starts) >= 2 and all(row["labels"][s] == IGNORE for s in starts)
    batch = LMCollator(0)(packed.features)
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
    for arch in ("llama", "gpt2"):
        model = tiny_model(arch, task="lm", vocab_size=260)
        check_packing(model, 0)  # raises if packed examples saw each other
        dm = DeltaModel(model)
        dm.add("p", {"method": "prefix", "num_virtual_tokens": 2})
        with pytest.raises(ConfigError, match="prefix tuning on packed rows .* set packing=False"):
            check_packing(dm, 0)  # the prefix refuses packed rows itself
        dm.remove("p")
        dm.add("v", {"method": "prompt", "num_virtual_tokens": 2})
        check_packing(dm, 0)  # virtual tokens go into each packed example: exact


def test_packed_training_loss_equals_separate_examples():
    """One packed row gives the same summed loss as its examples one by one."""
    tok = tiny_tokenizer()
    enc = encode_causal(tok, gen_task(template="{}"), GenExamples(["ab", "cde"], ["1", "22"]), 64)
    model = tiny_model("llama", task="lm", vocab_size=260)
    packed = LMCollator(0)(pack(enc, rows=1, max_length=64, seed=0).features[:1])
    logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits
    lab = packed["labels"][:, 1:]
    total = torch.nn.functional.cross_entropy(logits[:, :-1][lab != IGNORE], lab[lab != IGNORE], reduction="sum")
    row = pack(enc, rows=1, max_length=64, seed=0).features[0]
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    assert len(starts) > 3  # several examples in the row
    alone = 0.0
    for s0, s1 in zip(starts, starts[1:]):
        ids = torch.tensor([row["input_ids"][s0:s1]])
        la = torch.tensor([row["labels"][s0:s1]])[:, 1:]
        lg = model(input_ids=ids).logits[:, :-1]
        alone += float(torch.nn.functional.cross_entropy(lg[la != IGNORE], la[la != IGNORE], reduction="sum"))
    assert float(total) == pytest.approx(alone, rel=1e-5)


def test_dev_loss_is_the_models_own_token_loss():
    tok, task = tiny_tokenizer(), gen_task()
    model = tiny_model("llama", task="lm", vocab_size=260)
    enc = encode_causal(tok, task, GenExamples(["hi?"], ["there"]), 64)
    out = dev_loss(model, enc, 0, seq2seq=False, device="cpu")
    b = LMCollator(0)(enc.features)
    assert out["loss"] == pytest.approx(float(model(**b).loss), rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(out["loss"]), rel=1e-9)


# -- tasks and refusals -------------------------------------------------------------------------------
def test_e2e_task_groups_references_by_meaning_representation():
    task = get_task("e2e")
    dev, train = task.read("dev"), task.read("train")
    assert (task.kind, task.metric, len(dev), len(train)) == ("causal_lm", "bleu", 4693, 4672)
    assert len(dev.inputs()) == 630 and len(train.inputs()) == 547
    assert sum(len(r) for r in dev.references()) == 4693
    from deltatune.bench.tasks import e2e_root, verify_files

    assert verify_files(e2e_root()) == {"train.txt": True, "test.txt": True}
    gdev = gen_dev(tiny_tokenizer(), task, dev, 5, 512)
    assert len(gdev) == 5 and all(len(r) >= 1 for r in gdev.references)


def test_free_text_labels_are_refused_with_the_generation_mapping(tmp_path, qa_files):
    train = write_jsonl(tmp_path / "free.jsonl", [{"q": f"question {i}", "a": f"a free text answer number {i}"}
                                                   for i in range(30)])
    with pytest.raises(ConfigError, match="looks like free text.*prompt=COLUMN,completion=a"):
        parse_task(f"free:train={train},dev={train},text=q,label=a")


def test_mappings_choose_the_kind_and_bad_mappings_are_refused(qa_files):
    train, dev, chat = qa_files
    assert parse_task(f"a:train={train},dev={dev},prompt=q,completion=a").kind == "causal_lm"
    assert parse_task(f"b:train={chat},dev={chat},messages=m").kind == "causal_lm"
    assert parse_task(f"c:train={train},dev={dev},source=q,target=a").kind == "seq2seq"
    with pytest.raises(ConfigError, match="several kinds"):
        parse_task(f"d:train={train},dev={dev},prompt=q,completion=a,label=a")
    with pytest.raises(ConfigError, match="needs completion="):
        parse_task(f"e:train={train},dev={dev},prompt=q")
    with pytest.raises(ConfigError, match="no column 'nope'"):
        parse_task(f"f:train={train},dev={dev},prompt=nope,completion=a").read("train", None)


def test_empty_completions_are_skipped_and_counted(tmp_path):
    rows = [{"q": "a", "a": "x"}, {"q": "b", "a": ""}, {"q": "c", "a": "  "}, {"q": "d", "a": "y"}]
    f = write_jsonl(tmp_path / "e.jsonl", rows)
    ex = parse_task(f"e:train={f},dev={f},prompt=q,completion=a").read("train", None)
    assert ex.completions == ["x", "y"] and ex.notes == {"empty_completions_skipped": 2}


@pytest.mark.parametrize("model,kind,match", [
    ("tiny-bert", "causal_lm", "tiny-bert cannot do a causal_lm task: use tiny-gpt2 or tiny-llama"),
    ("tiny-t5", "causal_lm", "cannot do a causal_lm task"),
    ("tiny-llama", "seq2seq", "cannot do a seq2seq task: use tiny-t5"),
    (None, "causal_lm", "BertModel \\(bert\\), not a causal language model.*smollm2"),
])
def test_a_model_that_cannot_do_the_task_is_refused(model, kind, match):
    with pytest.raises(ConfigError, match=match):
        load_model(model, 0, 0, kind)


# -- through the CLI ----------------------------------------------------------------------------------
TINY = ["--threads", "1", "--batch-size", "4", "--steps", "4", "--eval-every", "2", "--max-new-tokens", "6", "--quiet"]


@pytest.mark.parametrize("model,mapping", [
    ("tiny-llama", "prompt=q,completion=a"), ("tiny-gpt2", "prompt=q,completion=a"),
    ("tiny-llama", "messages=m"), ("tiny-t5", "source=q,target=a"),
])
def test_each_task_kind_trains_evaluates_and_generates(tmp_path, qa_files, capsys, model, mapping):
    train, dev, chat = qa_files
    files = f"train={chat},dev={chat}" if mapping.startswith("messages") else f"train={train},dev={dev}"
    out = tmp_path / "run"
    assert main(["train", "--task", f"qa:{files},{mapping}", "--model", model, "--method", "lora",
                 "--out", str(out), "--json", *TINY]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert set(rec["metrics"]) == {"bleu", "rougeL", "exact_match", "loss", "perplexity"}
    assert rec["saved"] == "delta" and [c["step"] for c in rec["curve"]] == [0, 2, 4]
    assert rec["curve"][-1]["metrics"]["loss"] < rec["curve"][0]["metrics"]["loss"]  # it learned something
    assert main(["eval", str(out), "--json", "--predictions", str(tmp_path / "p.jsonl")]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["metrics"] == pytest.approx(rec["metrics"], abs=1e-6)  # the saved delta scores as trained
    preds = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(preds) == ev["n"] and all(set(p) == {"input", "output", "references"} for p in preds)
    assert main(["generate", str(out), "--prompt", "What is 2+2?", "--prompt", "Plural of cat?",
                 "--max-new-tokens", "6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2


def test_bench_on_e2e_reports_generation_metrics(tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["bench", "--tasks", "e2e", "--model", "tiny-gpt2", "--methods", "lora", "prefix",
                 "--dev-size", "4", "--max-length", "64", "--seeds", "0", "--out", str(out), *TINY]) == 0
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in recs] == ["ok", "ok"] and all(r["kind"] == "causal_lm" for r in recs)
    assert all(r["metric_name"] == "bleu" and len(r["samples"]) == 4 for r in recs)
    assert recs[0]["data"]["train"]["prompts_truncated"] > 0  # byte-level ids: E2E rows exceed 64
    summary = (out / "summary.md").read_text()
    assert "e2e (BLEU)" in summary and "## Generation" in summary
    assert (out / "loss_curves.png").is_file()


def test_full_fine_tuning_of_a_decoder_saves_and_reloads(tmp_path, qa_files, capsys):
    train, dev, _ = qa_files
    out = tmp_path / "full"
    assert main(["train", "--task", f"qa:train={train},dev={dev},prompt=q,completion=a", "--model", "tiny-llama",
                 "--method", "full", "--out", str(out), "--json", *TINY]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["saved"] == "full_model" and (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert main(["eval", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == pytest.approx(rec["metrics"], abs=1e-6)


def test_predictions_on_a_classification_task_are_refused(tmp_path, capsys):
    out = tmp_path / "cls"
    assert main(["train", "--task", "SST-2", "--model", "tiny-bert", "--method", "lora", "--out", str(out),
                 "--dev-size", "8", "--threads", "1", "--batch-size", "4", "--steps", "2", "--eval-every", "2",
                 "--quiet"]) == 0
    from deltatune.bench.single import eval_saved

    with pytest.raises(ConfigError, match="--predictions writes generations; SST-2 is a classification task"):
        eval_saved(str(out), predictions=str(tmp_path / "p.jsonl"))
    assert not (tmp_path / "p.jsonl").exists()
