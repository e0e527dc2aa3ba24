"""LST: identity at init, no gradient through the backbone, save/load, errors, a real run."""
import pytest
import torch

import deltatune as dt
from deltatune.models import logits_of, tiny_inputs, tiny_model
from realrun import finetune


def _perturbed(seed=0):
    model = tiny_model("bert", task="cls")
    dm = dt.wrap(model, dt.LSTConfig(reduction_factor=4))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dm.get_delta("default").parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model, dm


def test_identity_at_init_and_side_size():
    model = tiny_model("bert", task="cls")
    x = tiny_inputs(model)
    base = logits_of(model, x)
    dm = dt.wrap(model, dt.LSTConfig(reduction_factor=4))
    assert torch.allclose(logits_of(dm, x), base, atol=1e-6)
    side = dm.get_delta("default").layers["bert/encoder"]
    assert side.blocks[0].ln1.normalized_shape == (8,)  # 32 / 4
    assert len(side.blocks) == 2 and len(side.down) == 3


def test_backbone_gets_no_gradient_and_keeps_no_graph():
    model, dm = _perturbed()
    x = tiny_inputs(model, batch=3)
    x["labels"] = torch.tensor([0, 1, 1])
    seen = []

    def check(module, args, out):
        t = out[0] if isinstance(out, tuple) else out
        seen.append((t.requires_grad, t.grad_fn))

    backbone = [model.bert.embeddings, *model.bert.encoder.layer]
    handles = [m.register_forward_hook(check) for m in backbone]
    dm.train()
    loss = dm(**x).loss
    for h in handles:
        h.remove()
    assert len(seen) == 3 and all(rg is False and fn is None for rg, fn in seen)
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    delta = dm.get_delta("default")
    side = [p for n, p in delta.named_parameters() if "classifier" not in n]
    assert side and all(p.grad is not None and p.grad.abs().sum() > 0 for p in side)
    # the autograd graph reaches no base parameter: every leaf it accumulates into is the delta's
    leaves, stack, done = set(), [loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in done:
            continue
        done.add(fn)
        if hasattr(fn, "variable"):
            leaves.add(id(fn.variable))
        stack += [f for f, _ in fn.next_functions]
    assert leaves <= {id(p) for p in delta.parameters()}
    assert leaves & {id(p) for p in side}


def test_stacked_with_lora_the_ladders_stay_detached():
    model, dm = _perturbed()
    dm.add("lora", dt.LoRAConfig(r=2, modules_to_save=[]))
    dm.activate("default", "lora")
    x = tiny_inputs(model)
    x["labels"] = torch.tensor([0, 1])
    taps = dm.get_delta("default").layers["bert/encoder"].ladder
    captured = []
    side = dm.get_delta("default").layers["bert/encoder"]
    h = side.blocks[0].register_forward_pre_hook(lambda m, a: captured.append(list(taps.taps)))
    dm(**x).loss.backward()
    h.remove()
    assert captured and all(not t.requires_grad for t in captured[0])
    assert any(p.grad is not None for p in dm.get_delta("lora").parameters())


def test_save_load_round_trip_bit_exact(tmp_path):
    model, dm = _perturbed()
    x = tiny_inputs(model)
    want = logits_of(dm, x)
    dm.save(tmp_path / "lst")
    dm2 = dt.load(tiny_model("bert", task="cls"), tmp_path / "lst")
    assert torch.equal(logits_of(dm2, x), want)
    a, b = dm.get_delta("default").delta_state_dict(), dm2.get_delta("default").delta_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "bert.encoder.up.weight" in a and "bert.encoder.gates" in a


def test_layers_choose_the_ladders_and_merge_is_refused():
    model = tiny_model("bert", task="cls")
    dm = dt.wrap(model, dt.LSTConfig(layers=[1]))
    assert len(dm.get_delta("default").layers["bert/encoder"].blocks) == 1
    with pytest.raises(dt.MergeError, match="cannot be merged"):
        dm.merge()


def test_clear_errors():
    with pytest.raises(dt.TargetError, match="backbone_out|block"):
        dt.wrap(tiny_model("gpt2", task="cls"), dt.LSTConfig())
    with pytest.raises(dt.TargetError, match="not divisible by heads=3"):
        dt.wrap(tiny_model("bert", task="cls"), dt.LSTConfig(heads=3))
    with pytest.raises(dt.ConfigError, match="gate_temperature"):
        dt.LSTConfig(gate_temperature=0)


def test_learns_on_the_real_model():
    before, after, dm = finetune(dt.LSTConfig(), steps=100, lr=3e-3)
    assert after >= before + 0.15 and after >= 0.70, (before, after)
