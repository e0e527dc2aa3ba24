import torch
import torch.nn as nn
import torch.nn.functional as F

import deltatune as dt
from deltatune.models import logits_of, tiny_inputs, tiny_model


def _linear():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    dm = dt.wrap(nn.Sequential(lin), dt.MaskConfig(targets=["0"]))
    return lin, dm, dm.get_delta("default").layers["0"]


def test_all_ones_mask_is_exactly_the_base():
    model = tiny_model("llama")
    x = tiny_inputs(model)
    want = logits_of(model, x)
    dm = dt.wrap(model, dt.MaskConfig())
    with torch.no_grad():  # scores move, but stay above the threshold: still all ones
        for p in dm.get_delta("default").parameters():
            p.add_(torch.rand_like(p))
    assert torch.equal(logits_of(dm, x), want)
    dm.get_delta("default").finalize()
    assert torch.equal(logits_of(dm, x), want)


def test_threshold_and_straight_through_gradient():
    lin, dm, lay = _linear()
    with torch.no_grad():
        lay.scores["weight"][0, :3] = 0.0  # below the 5e-3 threshold: masked
    m = (lay.scores["weight"] >= 5e-3).float()
    x = torch.randn(4, 6)
    y = dm(x)
    assert torch.allclose(y, F.linear(x, lin.weight * m, lin.bias), atol=1e-6)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    # d loss / d (W m) = g^T x; the estimator passes it through the threshold, times W
    want = (g.T @ x) * lin.weight
    assert torch.allclose(lay.scores["weight"].grad, want, atol=1e-5)
    assert lin.weight.grad is None


def test_finalize_packs_the_mask_and_keeps_outputs():
    model = tiny_model("bert", task="cls")
    x = tiny_inputs(model)
    dm = dt.wrap(model, dt.MaskConfig())
    delta = dm.get_delta("default")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, lay in delta.compact_layers():
            s = lay.scores["weight"]
            s.copy_(torch.randn(s.shape, generator=g) * 0.01 + 0.01)
    masks = {p: lay.mask("weight").clone() for p, lay in delta.compact_layers()}
    tuned = logits_of(dm, x)
    density = delta.density()
    assert 0.5 < density < 1.0
    delta.finalize()
    assert torch.equal(logits_of(dm, x), tuned)
    assert delta.density() == density
    assert all(torch.equal(lay.mask("weight"), masks[p]) for p, lay in delta.compact_layers())
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier"))
    assert sum(p.numel() for p in dm.trainable_parameters()) == head  # only the task head


def test_init_sparsity_starts_that_fraction_masked():
    torch.manual_seed(0)
    model = tiny_model("bert")
    dm = dt.wrap(model, dt.MaskConfig(init_sparsity=0.2))
    assert abs(dm.get_delta("default").density() - 0.8) < 0.02
