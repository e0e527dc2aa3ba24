"""The harness end to end on a tiny random model: files, tables, ranges, determinism, resume."""
import json
import math

import pytest

from deltatune.bench import Budget, SuiteConfig, run_suite
from deltatune.bench import report
from deltatune.bench.data import group_by_length, train_indices

BUDGET = dict(steps=6, eval_every=3, batch_size=4, dev_size=32)


def suite(out, methods=("lora", "bitfit"), tasks=("SST-2",), model="tiny-bert", **kw):
    cfg = SuiteConfig(model=model, tasks=list(tasks), methods=list(methods), out=str(out),
                      budget=Budget(**{**BUDGET, **kw.pop("budget", {})}), quiet=kw.pop("quiet", True), **kw)
    return run_suite(cfg)


def lines(out):
    return (out / "results.jsonl").read_text(encoding="utf-8").splitlines()


def finite_in(x, lo, hi):
    return isinstance(x, float) and math.isfinite(x) and lo <= x <= hi


def test_micro_suite_files_table_and_ranges(tmp_path, one_thread):
    records = suite(tmp_path)
    assert len(records) == 2 and all(r["status"] == "ok" for r in records)
    for name in ("results.jsonl", "summary.md", "curves.png", "tradeoff.png", "efficiency.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [json.loads(x)["method"] for x in lines(tmp_path)] == ["lora", "bitfit"]

    for r in records:
        assert r["task"] == "SST-2" and r["metric_name"] == "accuracy" and r["seed"] == 0
        assert finite_in(r["metric"], 0, 1) and r["metric"] == r["metrics"]["accuracy"]
        assert [c["step"] for c in r["curve"]] == [0, 3, 6]
        assert all(finite_in(c["metric"], 0, 1) for c in r["curve"])
        assert [c["seconds"] for c in r["curve"]] == sorted(c["seconds"] for c in r["curve"])
        assert len(r["loss"]) == 6 and all(finite_in(x, 0, 50) for x in r["loss"])
        e = r["efficiency"]
        assert 0 < e["trainable"] < e["base_params"]
        assert finite_in(e["trainable_percent"], 0, 100) and e["trainable_percent"] > 0
        assert e["delta_bytes"] >= 4 * e["trainable"]  # float32 tensors + header
        assert e["step_time_median"] > 0 and e["throughput"] > 0 and e["peak_mem_mb"] >= e["mem_start_mb"] > 0
        assert e["mem_kind"] == "cpu_rss"
        c = r["convergence"]
        assert c["best"] == max(x["metric"] for x in r["curve"])
        assert r["environment"]["torch"] and r["budget"]["steps"] == 6
        assert {cfg["method"] for cfg in r["configs"]} == {r["method"]}

    md = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "| Method | Params (%) | SST-2 (acc) | Avg |" in md
    perf = md.split("## Performance")[1].split("##")[0]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in perf.splitlines() if line.startswith("| `")}
    lora = next(r for r in records if r["method"] == "lora")
    params, acc, avg = rows["`lora`"][:3]
    # one seed: the interval is a bootstrap over the 32 dev examples, whose predictions are recorded
    assert acc.rstrip("†") == avg and acc.startswith(f"{100 * lora['metric']:.1f} [")
    assert lora["dev"]["ids"] == sorted(lora["dev"]["ids"]) and len(lora["dev"]["pred"]) == 32
    assert sum(p == g for p, g in zip(lora["dev"]["pred"], lora["dev"]["gold"])) / 32 == lora["metric"]
    assert params == f"{lora['efficiency']['trainable_percent']:.3g}"
    assert "## Efficiency" in md and "## Convergence" in md and "Machine:" in md and "## Findings" in md


def test_same_seed_same_numbers(tmp_path, one_thread):
    a = suite(tmp_path / "a", methods=["lora+bitfit"], budget={"steps": 4, "eval_every": 2})
    b = suite(tmp_path / "b", methods=["lora+bitfit"], budget={"steps": 4, "eval_every": 2})
    for x, y in zip(a, b):
        assert x["loss"] == y["loss"] and x["metrics"] == y["metrics"]
        assert [c["metrics"] for c in x["curve"]] == [c["metrics"] for c in y["curve"]]
        assert x["key"] == y["key"]
    c = suite(tmp_path / "c", methods=["lora+bitfit"], budget={"steps": 4, "eval_every": 2}, seeds=[1])
    assert c[0]["loss"] != a[0]["loss"]  # another seed: another head, data order and init


def test_interrupted_suite_resumes(tmp_path, one_thread, capsys):
    suite(tmp_path, methods=["lora", "bitfit"], quiet=False)
    first = lines(tmp_path)
    capsys.readouterr()
    records = suite(tmp_path, methods=["lora", "bitfit", "layernorm"], quiet=False)
    err = capsys.readouterr().err
    assert err.count("done already, skipped") == 2 and "[3/3] layernorm on SST-2" in err
    now = lines(tmp_path)
    assert now[:2] == first and len(now) == 3 and json.loads(now[2])["method"] == "layernorm"
    assert [r["method"] for r in records] == ["lora", "bitfit", "layernorm"]
    # a run killed while writing leaves half a line: it is ignored and that cell runs again
    (tmp_path / "results.jsonl").write_text("\n".join(now[:2]) + "\n" + now[2][:40], encoding="utf-8")
    assert len(report.read(tmp_path / "results.jsonl")) == 2
    suite(tmp_path, methods=["lora", "bitfit", "layernorm"])
    assert [json.loads(x)["method"] for x in lines(tmp_path) if x.endswith("}")][-1] == "layernorm"
    # another budget is another cell
    suite(tmp_path, methods=["lora"], budget={"steps": 3})
    assert len(report.read(tmp_path / "results.jsonl")) == 4


def test_a_failing_method_is_recorded_and_the_suite_goes_on(tmp_path, one_thread):
    records = suite(tmp_path, methods=["bitfit", "lora"], model="tiny-llama")  # Llama has no biases
    status = {r["method"]: r["status"] for r in records}
    assert status == {"bitfit": "failed", "lora": "ok"}
    bad = next(r for r in records if r["method"] == "bitfit")
    assert "TargetError" in bad["error"] and "bias" in bad["error"]
    md = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "| `bitfit` | – | failed | – |" in md and "## Runs that failed" in md
    suite(tmp_path, methods=["bitfit", "lora"], model="tiny-llama")  # failures are retried, successes not
    assert [json.loads(x)["method"] for x in lines(tmp_path)] == ["bitfit", "lora", "bitfit"]


def test_learnable_file_task_is_learned(tmp_path, reviews, one_thread):
    train, dev = reviews
    task = f"reviews:train={train},dev={dev},text=review,label=verdict"
    (r,) = suite(tmp_path, methods=["full:lr=3e-3"], tasks=[task], plots=False,
                 budget={"steps": 60, "eval_every": 20, "batch_size": 16, "dev_size": 0})
    assert r["curve"][0]["metric"] < 0.7 and r["metric"] >= 0.9
    assert r["convergence"]["steps_to_90"] in (20, 40, 60)
    assert r["loss"][-1] < 0.5 * r["loss"][0]


def test_regression_and_pair_tasks_on_a_decoder(tmp_path, one_thread):
    records = suite(tmp_path, methods=["lora"], tasks=["STS-B", "RTE"], model="tiny-gpt2", plots=False)
    assert [r["status"] for r in records] == ["ok", "ok"], [r.get("error") for r in records]
    stsb = records[0]
    assert set(stsb["metrics"]) == {"pearson", "spearman"}
    assert all(finite_in(v, -1, 1) for v in stsb["metrics"].values())
    md = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "| Method | Params (%) | STS-B (Pearson) | RTE (acc) | Avg |" in md


def test_training_order():
    idx = train_indices(10, 4, 8, seed=3)
    assert len(idx) == 32 and sorted(idx[:10]) == list(range(10))  # whole epochs, then more
    assert idx == train_indices(10, 4, 8, seed=3) != train_indices(10, 4, 8, seed=4)
    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6, 10, 11, 12]
    order = group_by_length(lengths, batch=3, seed=0, window=2)
    assert sorted(order) == list(range(12))
    batches = [order[i:i + 3] for i in range(0, 12, 3)]
    for start in (0, 6):  # each window of 2 batches is sorted by length, then batches are shuffled
        window = [b for b in batches if b[0] in range(start, start + 6)]
        assert sorted(i for b in window for i in b) == list(range(start, start + 6))
        for b in window:
            assert all(lengths[i] >= lengths[j] for i, j in zip(b, b[1:]))
