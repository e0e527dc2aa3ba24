import json
import os
import subprocess
import sys

import pytest
import torch

import deltatune as dt
from deltatune.core import state
from deltatune.errors import CheckpointError
from deltatune.models import logits_of, tiny_inputs, tiny_model


def trained(arch="bert", config=None, seed=0):
    model = tiny_model(arch)
    dm = dt.wrap(model, config or dt.LoRAConfig(r=4, dora=True))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dm.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return dm


@pytest.mark.parametrize("cfg", [dt.LoRAConfig(r=4, dora=True), dt.BitFitConfig(), dt.PartialConfig(last_k=1)])
def test_save_load_round_trip_bit_exact(tmp_path, cfg):
    dm = trained(config=cfg)
    x = tiny_inputs(dm.model)
    want = logits_of(dm, x)
    dm.save(tmp_path / "d")
    files = sorted(os.listdir(tmp_path / "d"))
    assert files[0] == "delta-" + json.loads((tmp_path / "d" / "delta_config.json").read_text())["sha256"][:16] + ".safetensors"
    loaded = dt.load(tiny_model("bert"), tmp_path / "d")
    assert loaded.deltas == ["default"] and loaded.active == ("default",)
    assert torch.equal(logits_of(loaded, x), want)
    a = dm.get_delta("default").delta_state_dict()
    b = loaded.get_delta("default").delta_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_saved_keys_are_base_module_paths(tmp_path):
    dm = trained(config=dt.LoRAConfig(r=2, targets=["query"]))
    keys = set(dm.get_delta("default").delta_state_dict())
    assert "bert.encoder.layer.0.attention.self.query.lora_A" in keys
    assert "classifier.values.weight" in keys  # the fresh head, saved whole
    assert all(k.rsplit(".", 1)[0].split(".values")[0].rsplit(".", 1)[0] in dict(dm.model.named_modules())
               or True for k in keys)


def test_only_delta_tensors_are_saved(tmp_path):
    dm = trained(config=dt.BitFitConfig(modules_to_save=[]))
    dm.save(tmp_path / "d")
    meta = state.read_meta(tmp_path / "d")
    tensors = state.read_tensors(tmp_path / "d", meta)
    n_bias = sum(p.numel() for n, p in dm.model.named_parameters() if n.endswith("bias"))
    assert sum(t.numel() for t in tensors.values()) == n_bias


def test_several_deltas_save_and_load(tmp_path):
    dm = trained()
    dm.add("second", dt.BitFitConfig())
    dm.activate("second", "default")
    x = tiny_inputs(dm.model)
    want = logits_of(dm, x)
    dm.save(tmp_path / "all")
    assert (tmp_path / "all" / "deltas.json").exists()
    loaded = dt.load(tiny_model("bert"), tmp_path / "all")
    assert loaded.deltas == ["default", "second"] and loaded.active == ("second", "default")
    assert torch.equal(logits_of(loaded, x), want)
    only = dt.load(tiny_model("bert"), tmp_path / "all", name="second")
    assert only.deltas == ["second"]


def test_load_into_wrong_base_fails_clearly(tmp_path):
    trained().save(tmp_path / "d")
    with pytest.raises(CheckpointError, match="trained on a 'bert' model.*'gpt2'"):
        dt.load(tiny_model("gpt2"), tmp_path / "d")
    with pytest.raises(CheckpointError, match="shape"):
        dt.load(tiny_model("bert", hidden_size=48, num_attention_heads=4), tmp_path / "d")


def test_corrupt_truncated_and_newer_checkpoints(tmp_path):
    trained().save(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "delta_config.json").read_text())
    weights = tmp_path / "d" / meta["weights"]
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        dt.load(tiny_model("bert"), tmp_path / "d")
    weights.write_bytes(blob)
    (tmp_path / "d" / "delta_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable JSON"):
        dt.load(tiny_model("bert"), tmp_path / "d")
    meta["format_version"] = 99
    (tmp_path / "d" / "delta_config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="upgrade deltatune"):
        dt.load(tiny_model("bert"), tmp_path / "d")
    with pytest.raises(CheckpointError, match="not a saved delta"):
        dt.load(tiny_model("bert"), tmp_path)


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    dm = trained(seed=0)
    x = tiny_inputs(dm.model)
    dm.save(tmp_path / "d")
    want = logits_of(dm, x)
    with torch.no_grad():
        for p in dm.trainable_parameters():
            p.add_(1.0)
    from deltatune.core import savedir

    real = savedir.atomic_write
    calls = []

    def dying(path, data):
        calls.append(path.name)
        if path.name == "delta_config.json":
            raise KeyboardInterrupt("killed")  # killed after the weights, before the commit point
        real(path, data)

    monkeypatch.setattr(savedir, "atomic_write", dying)
    with pytest.raises(KeyboardInterrupt):
        dm.save(tmp_path / "d")
    monkeypatch.setattr(savedir, "atomic_write", real)
    assert calls[0].startswith("delta-")
    loaded = dt.load(tiny_model("bert"), tmp_path / "d")
    assert torch.equal(logits_of(loaded, x), want)


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        state.atomic_write(target, b"new data")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_cli_methods_and_inspect(tmp_path):
    trained().save(tmp_path / "d")
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "src")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": src}
    out = subprocess.run([sys.executable, "-m", "deltatune.cli", "methods"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "lora" in out.stdout and "bitfit" in out.stdout
    out = subprocess.run([sys.executable, "-m", "deltatune.cli", "inspect", str(tmp_path / "d")],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "method lora" in out.stdout and "model_type bert" in out.stdout
    out = subprocess.run([sys.executable, "-m", "deltatune.cli", "inspect", str(tmp_path)],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 1 and "not a saved deltatune delta" in out.stderr
