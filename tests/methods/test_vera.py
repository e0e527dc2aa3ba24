"""VeRA: shared frozen projections regenerated from a saved seed; only the vectors are saved."""
import json

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.models import logits_of, tiny_inputs, tiny_model


def trained(arch, cfg):
    model = tiny_model(arch)
    dm = dt.wrap(model, cfg)
    with torch.no_grad():
        for layer in dm.get_delta("default").layers.values():
            if hasattr(layer, "vera_lambda_b"):
                layer.vera_lambda_b.normal_(std=0.3)
                layer.vera_lambda_d.normal_(std=0.3)
    return model, dm


@pytest.mark.parametrize("seed", [7, None])
def test_saved_delta_holds_only_vectors_and_seed(arch, seed, tmp_path):
    model, dm = trained(arch, dt.VeRAConfig(r=8, projection_prng_key=seed))
    x = tiny_inputs(model)
    tuned = logits_of(dm, x)
    delta = dm.get_delta("default")
    dm.save(tmp_path / "v")
    meta = json.loads((tmp_path / "v" / "delta_config.json").read_text())
    tensors = load_file(tmp_path / "v" / meta["weights"])
    heads = {k for k in tensors if ".values." in k}
    assert tensors.keys() - heads == {f"{p}.{n}" for p in delta.paths() if f"{p}.vera_lambda_b" in tensors
                                      for n in ("vera_lambda_b", "vera_lambda_d")}
    assert all(t.dim() == 1 for k, t in tensors.items() if k not in heads)   # vectors only
    assert not any("vera_A" in k or "vera_B" in k for k in tensors)
    state = meta["extra_state"]
    assert state["projection_prng_key"] == delta.projections.seed
    if seed is not None:
        assert state["projection_prng_key"] == seed

    fresh = tiny_model(arch)
    torch.manual_seed(12345)  # a different global RNG state must not matter
    dm2 = dt.load(fresh, tmp_path / "v")
    p2 = dm2.get_delta("default").projections
    assert torch.equal(p2.vera_A, delta.projections.vera_A) and torch.equal(p2.vera_B, delta.projections.vera_B)
    assert torch.equal(logits_of(dm2, x), tuned)


def test_projections_are_shared_and_sliced():
    model = tiny_model("llama")
    dm = dt.wrap(model, dt.VeRAConfig(r=4, targets=["q_proj", "k_proj", "down_proj"]))
    delta = dm.get_delta("default")
    assert delta.projections.vera_A.shape == (4, 64) and delta.projections.vera_B.shape == (32, 4)
    k = delta.layers["model/layers/0/self_attn/k_proj"]        # in 32, out 16
    with torch.no_grad():
        k.vera_lambda_b.normal_()
    a, b = delta.projections.vera_A[:, :32], delta.projections.vera_B[:16, :]
    assert torch.allclose(k.update(), (k.vera_lambda_b[:, None] * b) @ (k.vera_lambda_d[:, None] * a))
    trainable = {n for n, p in delta.named_parameters()}
    assert not any("vera_A" in n or "vera_B" in n for n in trainable)
    assert len([b for b in delta.buffers() if b.dim() == 2]) == 2  # one A and one B for all layers


def test_changed_generator_is_detected(tmp_path):
    model, dm = trained("bert", dt.VeRAConfig(r=8))
    dm.save(tmp_path / "v")
    meta_path = tmp_path / "v" / "delta_config.json"
    meta = json.loads(meta_path.read_text())
    meta["extra_state"]["checksum"] = "0" * 16
    del meta["meta_sha256"]  # a deliberate edit (else the config's own checksum refuses it first)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(dt.CheckpointError, match="regenerated"):
        dt.load(tiny_model("bert"), tmp_path / "v")
