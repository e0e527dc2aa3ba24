"""`deltatune train` survives interruption: a run stopped at step k and resumed ends with the same
delta and metrics, bit for bit, as an unbroken run; a non-finite loss stops it cleanly."""
import json

import pytest
import torch

import deltatune as dt
from deltatune.bench import Budget, SuiteConfig
from deltatune.bench import checkpoint as C
from deltatune.bench import suite
from deltatune.bench.single import CHECKPOINT_DIR, train_one
from deltatune.cli import main
from deltatune.core import state
from deltatune.errors import CheckpointError, TrainingError
from deltatune.models import tiny_model

METHOD = "lora:r=4,dropout=0.1"  # dropout (and BERT's own): the RNG state matters


def cfg(steps=10):
    return SuiteConfig(model="tiny-bert", budget=Budget(steps=steps, batch_size=4, eval_every=5, dev_size=32),
                       quiet=True, threads=1)


def tensors(path):
    return state.read_tensors(path, state.read_meta(path))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    out = tmp_path_factory.mktemp("unbroken")
    return train_one(cfg(), "SST-2", METHOD, 0, str(out)), tensors(out)


def test_killed_run_resumes_bit_exact(tmp_path, unbroken):
    rec, want = unbroken
    out = tmp_path / "run"
    with pytest.raises(C.TrainingStopped):  # killed after step 7; the last checkpoint is step 6
        train_one(cfg(), "SST-2", METHOD, 0, str(out), checkpoint_every=3, stop_after=7)
    saved = torch.load(out / CHECKPOINT_DIR / C.STATE_FILE, weights_only=True)
    assert saved["step"] == 6 and len(saved["losses"]) == 6 and not (out / "train_result.json").exists()
    part = dt.load(tiny_model("bert"), out / CHECKPOINT_DIR / C.DELTA_DIR)  # the checkpoint's delta loads
    assert part.deltas == ["lora"]
    again = train_one(cfg(), "SST-2", METHOD, 0, str(out), checkpoint_every=3)
    assert same(tensors(out), want)
    assert again["loss"] == rec["loss"] and again["metrics"] == rec["metrics"]
    assert [c["metrics"] for c in again["curve"]] == [c["metrics"] for c in rec["curve"]]


def test_resume_needs_the_rng_state(tmp_path, unbroken, monkeypatch):
    """The check above can fail: resuming without the RNG states gives another delta."""
    out = tmp_path / "run"
    with pytest.raises(C.TrainingStopped):
        train_one(cfg(), "SST-2", METHOD, 0, str(out), checkpoint_every=3, stop_after=3)
    monkeypatch.setattr("deltatune.bench.loop.set_rng_state", lambda s: None)
    torch.manual_seed(123)
    train_one(cfg(), "SST-2", METHOD, 0, str(out), checkpoint_every=3)
    assert not same(tensors(out), unbroken[1])


def test_checkpoint_of_another_run_is_refused(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(C.TrainingStopped):
        train_one(cfg(steps=4), "SST-2", "bitfit", 0, str(out), checkpoint_every=2, stop_after=2)
    with pytest.raises(CheckpointError, match="belongs to another run.*--restart"):
        train_one(cfg(steps=4), "SST-2", "bitfit", 1, str(out), checkpoint_every=2)
    (out / CHECKPOINT_DIR / C.STATE_FILE).write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match="not a readable training checkpoint"):
        train_one(cfg(steps=4), "SST-2", "bitfit", 0, str(out), checkpoint_every=2)
    rec = train_one(cfg(steps=4), "SST-2", "bitfit", 0, str(out), checkpoint_every=2, restart=True)
    assert len(rec["loss"]) == 4


def inject_nan_at(monkeypatch, at_step):
    """The classifier's output turns NaN at the `at_step`-th training forward pass."""
    real = suite.build

    def build(*a, **k):
        built = real(*a, **k)
        calls = []

        def hook(module, args, out):
            if module.training:
                calls.append(1)
                if len(calls) == at_step:
                    return out * float("nan")
            return out

        built.delta.model.classifier.register_forward_hook(hook)
        return built

    monkeypatch.setattr(suite, "build", build)


def test_non_finite_loss_stops_with_last_good_checkpoint(tmp_path, monkeypatch):
    inject_nan_at(monkeypatch, 5)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"step 5: the loss is nan.*not updated.*last good checkpoint "
                                            r"is step 4.*--lr") as err:
        train_one(cfg(steps=8), "SST-2", "lora:r=4", 0, str(out), checkpoint_every=2)
    assert str(out / CHECKPOINT_DIR) in str(err.value)
    good = tensors(out / CHECKPOINT_DIR / C.DELTA_DIR)
    assert all(torch.isfinite(t).all() for t in good.values())
    assert torch.load(out / CHECKPOINT_DIR / C.STATE_FILE, weights_only=True)["step"] == 4
    assert not (out / "train_result.json").exists()


def test_cli_stop_resume_and_nan_message(tmp_path, monkeypatch, capsys):
    args = ["train", "--model", "tiny-bert", "--threads", "1", "--task", "SST-2", "--method", "bitfit",
            "--steps", "4", "--batch-size", "4", "--eval-every", "2", "--dev-size", "16", "--quiet",
            "--checkpoint-every", "2", "--out", str(tmp_path / "c")]
    assert main([*args, "--stop-after", "2"]) == 3
    assert "stopped after step 2" in capsys.readouterr().err
    assert main(args) == 0
    assert json.loads((tmp_path / "c" / "train_result.json").read_text())["status"] == "ok"
    inject_nan_at(monkeypatch, 1)
    assert main([*args[:-1], str(tmp_path / "n")]) == 1
    err = capsys.readouterr().err
    assert "deltatune: error: training stopped at step 1: the loss is nan" in err
    assert "No checkpoint was written yet (every 2 steps)" in err
