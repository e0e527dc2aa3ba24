"""The configuration search: space parsing, a budgeted search on a tiny model, reproduction."""
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.bench.methods import parse_method
from deltatune.errors import ConfigError
from deltatune.models import tiny_model
from deltatune.search import parse_space, search, spec_of

SRC = str(Path(__file__).resolve().parents[2] / "src")


def keyword_task(tmp_path: Path, n_train: int = 400, n_dev: int = 60) -> str:
    """An easy task a tiny model learns in a few steps: the label is which keyword a text holds."""
    g = torch.Generator().manual_seed(0)
    words = [f"w{i}" for i in range(40)]
    for split, n in (("train", n_train), ("dev", n_dev)):
        with open(tmp_path / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for _ in range(n):
                y = int(torch.randint(0, 2, (1,), generator=g))
                filler = [words[int(i)] for i in torch.randint(0, 40, (6,), generator=g)]
                filler.insert(int(torch.randint(0, 6, (1,), generator=g)), ("great" if y else "awful"))
                w.writerow([" ".join(filler), y])
    return f"kw:train={tmp_path / 'train.csv'},dev={tmp_path / 'dev.csv'},text=text,label=label"


def test_space_parsing_and_specs():
    cands = parse_space(["lora:r=2|4,alpha=8", "ia3"])
    assert cands[0].size_field == "r" and cands[0].sizes == (2, 4) and cands[1].sizes == (True,)
    text = spec_of({(0, 0): 2, (0, 1): 1, (0, 2): 2, (1, 1): 1}, cands, 3)
    assert text == "lora:alpha=8,r=2,layers=[1]+lora:alpha=8,r=4,layers=[0,2]+ia3:layers=[1]"
    spec = parse_method(text)
    assert [c.options["layers"] for c in spec.components] == [[1], [0, 2], [1]]
    with pytest.raises(ConfigError, match="only one field"):
        parse_space(["lora:r=2|4,alpha=8|16"])
    with pytest.raises(ConfigError, match="layers"):
        parse_space(["lora:layers=[0]"])
    with pytest.raises(ConfigError):
        parse_space(["lora:r=0|4"])  # every size is validated up front
    with pytest.raises(ConfigError, match="twice"):
        parse_space(["ia3", "ia3"])


def test_search_respects_budgets_and_its_score_reproduces(tmp_path):
    task = keyword_task(tmp_path)
    tiny_model("bert", task="cls")  # imports warmed, so the budget measures the search itself
    budget, limit = 30.0, 2500
    t0 = time.monotonic()
    res = search(task, model="tiny-bert", time_budget=budget, space=["lora:r=2|8", "ia3", "bitfit"],
                 max_params=limit, steps=48, batch_size=8, eval_every=12, dev_size=64, seed=3,
                 lr=5e-2, threads=1, out=tmp_path / "best")
    elapsed = time.monotonic() - t0
    assert elapsed <= budget, elapsed
    done = [t for t in res.trials if t["status"] == "complete"]
    assert done and res.score == max(t["score"] for t in done)
    assert res.trainable <= limit and all(t["trainable"] <= limit for t in done)
    assert all(t["status"] == "over_budget" for t in res.trials if t.get("trainable", 0) > limit)
    assert res.score > 0.6  # the keyword task is learnable: the search finds something that learns
    # a normal composite config: every component a registered method restricted to layers
    spec = parse_method(res.spec)
    assert [c["method"] for c in res.configs] == [c.method for c in spec.components]
    # reproduction: retraining the configuration with the same seed gives the same score and losses
    again = res.retrain()
    assert again["metric"] == res.score and again["loss"] == res.loss
    # saved like any delta: loads onto a fresh base and computes what the trained one computes
    x = {"input_ids": torch.tensor([[3, 10, 11, 2]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    loaded = dt.load(tiny_model("bert", task="cls"), tmp_path / "best")
    assert sorted(loaded.deltas) == sorted(res.model.deltas)
    res.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, res.model(**x).logits)
    saved = json.loads((tmp_path / "best" / "search_result.json").read_text())
    assert saved["spec"] == res.spec and saved["score"] == res.score and saved["elapsed"] <= budget


def test_too_small_a_budget_is_a_clear_error(tmp_path):
    task = keyword_task(tmp_path, 100, 20)
    with pytest.raises(ConfigError, match="no configuration finished"):
        search(task, model="tiny-bert", time_budget=0.01, space=["ia3"], steps=5, dev_size=20)


def test_cli_search(tmp_path):
    task = keyword_task(tmp_path, 200, 30)
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "deltatune.cli", "search", "--task", task, "--model", "tiny-bert",
           "--time-budget", "300", "--trials", "2", "--steps", "8", "--eval-every", "4",
           "--search-dev-size", "32", "--space", "lora:r=2|4", "ia3", "--out", str(tmp_path / "o"), "--quiet"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "best of 2 trials" in out.stdout and "method: " in out.stdout
    res = json.loads((tmp_path / "o" / "search_result.json").read_text())
    assert len(res["trials"]) == 2
    dm = dt.load(tiny_model("bert", task="cls"), tmp_path / "o")
    assert dm.active
