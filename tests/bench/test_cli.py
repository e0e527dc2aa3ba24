"""`deltatune bench / train / eval` as a user runs them (subprocesses on the checkout's src)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deltatune.bench import Budget, SuiteConfig
from deltatune.bench.single import eval_saved, train_one
from deltatune.cli import main
from deltatune.errors import CheckpointError

SRC = str(Path(__file__).resolve().parents[2] / "src")
TINY = ["--model", "tiny-bert", "--threads", "1", "--batch-size", "4", "--dev-size", "32"]


def cli(*args):
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "deltatune.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def test_bench_cli_writes_results_and_resumes(tmp_path):
    args = ["bench", *TINY, "--tasks", "SST-2", "--methods", "lora:r=4", "bitfit", "--steps", "4",
            "--eval-every", "2", "--seeds", "0", "--out", str(tmp_path)]
    out = cli(*args)
    assert out.returncode == 0, out.stderr
    assert "| Method | Params (%) | SST-2 (acc) | Avg |" in out.stdout and "| `lora:r=4` |" in out.stdout
    assert "[2/2] bitfit on SST-2 (seed 0): accuracy" in out.stderr
    recs = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["method"] for r in recs] == ["lora:r=4", "bitfit"] and recs[0]["configs"][0]["r"] == 4
    assert all((tmp_path / f).is_file() for f in ("summary.md", "curves.png", "tradeoff.png", "efficiency.png"))



def test_bench_in_process_resumes_and_lists(tmp_path, capsys, one_thread):
    args = ["bench", *TINY, "--tasks", "SST-2", "--methods", "bitfit", "--steps", "2", "--eval-every", "2",
            "--seeds", "0", "--out", str(tmp_path), "--no-plots"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 0
    cap = capsys.readouterr()
    assert "[1/1] bitfit on SST-2 (seed 0): done already, skipped" in cap.err and "| `bitfit` |" in cap.out
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 1  # nothing re-ran
    assert main(["bench", "--list", "--exclude", "partial"]) == 0
    listing = capsys.readouterr().out
    assert "method full" in listing and "method lora " in listing and "method partial" not in listing
    for name in ("quick", "paper", "combos", "nlg"):  # every suite with its budget
        assert f"suite  {name}" in listing
    assert listing.count("       budget ") == 4 and "this run:" in listing
    assert "budget 140 steps x batch 16" in listing  # the quick suite's, the default
    before = (tmp_path / "results.jsonl").read_bytes()
    i = args.index("--seeds")
    assert main([*args[:i], "--seeds", "0", "1", *args[i + 2:], "--report"]) == 0  # seed 1: planned, not run
    cap = capsys.readouterr()
    assert "**Partial: 1 of 2 planned runs finished**" in (tmp_path / "summary.md").read_text()
    assert "report of 1 runs" in cap.out and (tmp_path / "results.jsonl").read_bytes() == before


def resolved(*argv):
    from deltatune.cli import build_parser
    from deltatune.commands.bench import resolve

    return resolve(build_parser().parse_args(["bench", *argv]))


def test_suites_set_defaults_that_the_command_line_overrides():
    from deltatune.bench.methods import default_methods
    from deltatune.bench.suites import SUITES

    quick = resolved()
    assert quick.tasks == ["SST-2"] and len(quick.seeds) >= 3 and quick.model is None
    assert {"full", "lora", "adapter", "prompt"} <= set(quick.methods) and any(m.startswith("prefix") for m in quick.methods)
    assert quick.budget == SUITES["quick"].budget
    paper = resolved("--suite", "paper")
    assert len(paper.tasks) >= 4 and paper.seeds == [0, 1, 2] and "full" in paper.methods and len(paper.methods) > 15
    assert resolved("--suite", "nlg").model == "smollm2"
    assert resolved("--methods", "all").methods == default_methods()
    mixed = resolved("--suite", "paper", "--steps", "7", "--seeds", "4", "--tasks", "RTE", "--exclude", "full")
    assert mixed.budget.steps == 7 and mixed.budget.dev_size == SUITES["paper"].budget.dev_size
    assert mixed.seeds == [4] and mixed.tasks == ["RTE"] and "full" not in mixed.methods
    assert resolved("--steps", "5").budget.eval_every == 5  # never scored less often than once per run
    combos = resolved("--suite", "combos").methods
    assert len(combos) == 7 and {"adapter", "bitfit", "prompt", "adapter+bitfit+prompt"} <= set(combos)


def test_killed_suite_resumes_where_it_stopped(tmp_path):
    """SIGKILL the CLI after its first run is written; the rerun skips it and finishes the rest."""
    import signal
    import time

    args = ["bench", *TINY, "--tasks", "SST-2", "--methods", "bitfit", "lora", "layernorm", "--steps", "30",
            "--eval-every", "10", "--seeds", "0", "--no-plots", "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "deltatune.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = tmp_path / "results.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (results.is_file() and results.read_text().strip()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = [json.loads(x)["method"] for x in results.read_text().splitlines() if x.endswith("}")]
    assert first and first[0] == "bitfit"
    out = cli(*args)
    assert out.returncode == 0, out.stderr
    assert "[1/3] bitfit on SST-2 (seed 0): done already, skipped" in out.stderr
    recs = [json.loads(x) for x in results.read_text().splitlines() if x.endswith("}")]
    assert [r["method"] for r in recs if r["status"] == "ok"].count("bitfit") == 1
    assert {r["method"] for r in recs} == {"bitfit", "lora", "layernorm"} and "wall time:" in out.stdout


def test_train_then_eval_reproduces_the_dev_score(tmp_path):
    d = tmp_path / "d"
    out = cli("train", *TINY, "--task", "SST-2", "--method", "lora+bitfit", "--steps", "6", "--eval-every", "3",
              "--out", str(d), "--quiet", "--json")
    assert out.returncode == 0, out.stderr
    rec = json.loads(out.stdout)
    assert rec["saved"] == "delta" and (d / "deltas.json").is_file() and (d / "train_result.json").is_file()
    ev = cli("eval", str(d), "--dev-size", "32", "--json")
    assert ev.returncode == 0, ev.stderr
    res = json.loads(ev.stdout)
    assert res["task"] == "SST-2" and res["n"] == 32 and res["model"] == "tiny-bert"
    assert res["metrics"] == rec["metrics"]  # same delta, same dev subset: the same numbers


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["bench", "--model", "tiny-bert", "--methods", "lorra", "--out", str(tmp_path)]) == 1
    assert "deltatune: error: unknown method 'lorra'. Did you mean: lora" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "none")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--task", "SST-2", "--method", "lora", "--out", str(tmp_path), "--steps", "0"]) == 1
    assert "steps=0 must be >= 1" in capsys.readouterr().err


def test_full_fine_tuning_saves_the_model_and_eval_reloads_it(tmp_path, one_thread):
    cfg = SuiteConfig(model="tiny-bert", budget=Budget(steps=4, eval_every=2, batch_size=4, dev_size=32), quiet=True)
    rec = train_one(cfg, "RTE", "full:lr=1e-3", 0, str(tmp_path))
    assert rec["saved"] == "full_model" and (tmp_path / "config.json").is_file()
    assert rec["efficiency"]["trainable_percent"] == 100.0
    res = eval_saved(str(tmp_path), dev_size=32)
    assert res["task"] == "RTE" and res["metrics"] == rec["metrics"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a saved delta"):
        eval_saved(str(tmp_path / "empty"), task_spec="RTE")
