"""Task arithmetic (core/task_arith.py): add, negate, scale every mergeable delta; the merging
strategies equal peft's definitions; LoRA's cat / magnitude_prune / dare_ties."""
import pytest
import torch
from peft.utils import merge_utils

import deltatune as dt
from deltatune.core import task_arith
from deltatune.models import logits_of, tiny_inputs, tiny_model

from test_compose import dense_sum, lora_pair, outputs, perturb, updates


def taus(seed=0, n=3, shape=(6, 5)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_dense_strategies_equal_peft(density):
    t, w = taus(), [1.0, -0.5, 0.7]
    wt = torch.tensor(w, dtype=torch.float64)
    assert torch.allclose(task_arith.combine(t, w, "linear"), merge_utils.task_arithmetic(t, wt))
    assert torch.allclose(task_arith.combine(t, w, "magnitude_prune", density),
                          merge_utils.magnitude_prune(t, wt, density))
    assert torch.allclose(task_arith.combine(t, w, "ties", density), merge_utils.ties(t, wt, density))


def test_dare_strategies_drop_rescale_and_elect():
    t, w = taus(1), [1.0, 0.5, -1.0]
    wt = torch.tensor(w, dtype=torch.float64)
    # density 1 drops nothing: dare is the weighted sum, dare_ties is ties without a trim (peft's too)
    assert torch.allclose(task_arith.combine(t, w, "dare", 1.0), merge_utils.task_arithmetic(t, wt))
    assert torch.allclose(task_arith.combine(t, w, "dare_ties", 1.0), merge_utils.ties(t, wt, 1.0))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    got = task_arith.combine(t, w, "dare_ties", 0.4, g1)
    keep = torch.rand(torch.stack(t).shape, generator=g2, dtype=torch.float64) < 0.4
    dropped = torch.stack(t) * keep / 0.4  # then peft's sign election and disjoint mean on the rest
    want = merge_utils.disjoint_merge(dropped * wt.view(-1, 1, 1),
                                      merge_utils.calculate_majority_sign_mask(dropped))
    assert torch.allclose(got, want)
    # one entry that exactly one task keeps survives at w_i * tau_i / density
    only = keep.sum(0) == 1
    assert only.any()


def test_lora_cat_magnitude_prune_and_dare_ties():
    dm, _ = lora_pair()
    w = [1.0, -0.5]
    exact = dense_sum(dm, ["a", "b"], w)
    cat = dm.add_weighted("cat", ["a", "b"], w, how="cat")
    lin = dm.add_weighted("lin", ["a", "b"], w, how="linear")
    assert all(torch.equal(u, updates(lin)[p]) for p, u in updates(cat).items())
    assert all(torch.allclose(u, exact[p], atol=1e-6) for p, u in updates(cat).items())
    path = "bert.encoder.layer.0.attention.self.query"
    t = [updates(dm.get_delta(n))[path].double() for n in ("a", "b")]
    mp = dm.add_weighted("mp", ["a", "b"], w, how="magnitude_prune", density=0.3, rank=32)
    want = merge_utils.magnitude_prune(t, torch.tensor(w, dtype=torch.float64), 0.3)
    assert torch.allclose(updates(mp)[path].double(), want, atol=1e-5)
    dt1 = dm.add_weighted("dt1", ["a", "b"], w, how="dare_ties", density=1.0, rank=32)
    want = merge_utils.ties(t, torch.tensor(w, dtype=torch.float64), 1.0)
    assert torch.allclose(updates(dt1)[path].double(), want, atol=1e-5)
    with pytest.raises(dt.ConfigError, match="keeps every factor"):
        dm.add_weighted("x", ["a", "b"], how="cat", rank=2)
    with pytest.raises(dt.ConfigError, match="how='ties_svd' is unknown"):
        dm.add_weighted("x", ["a", "b"], how="ties_svd")


def base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def merged_weights(dm, name):
    dm.activate(name)
    dm.merge()
    got = {n: p.detach().clone() for n, p in dm.model.named_parameters()}
    dm.unmerge()
    return got


@pytest.mark.parametrize("config", [dt.IA3Config(), dt.BitFitConfig(), dt.LoHaConfig(r=2), dt.VeRAConfig(r=4)],
                         ids=lambda c: c.method)
def test_every_mergeable_method_adds_negates_and_scales(config, tmp_path):
    model = tiny_model("bert")
    x = tiny_inputs(model)
    dm = dt.wrap(model, config, name="a")
    dm.add("b", config)
    perturb(dm.get_delta("a"), std=0.05, seed=1)
    perturb(dm.get_delta("b"), std=0.05, seed=2)
    base = base_weights(model)
    wa, wb = merged_weights(dm, "a"), merged_weights(dm, "b")
    new = dm.add_weighted("ab", ["a", "b"], [1.0, -0.5])  # a - b / 2, in weight space
    assert new.config.method == "partial" and dm.active == ("b",)  # added inactive
    got = merged_weights(dm, "ab")
    for n in base:
        want = base[n] + (wa[n] - base[n]) - 0.5 * (wb[n] - base[n])
        assert torch.allclose(got[n], want, atol=1e-6), n
    assert any(not torch.equal(got[n], base[n]) for n in base)
    # the combined delta runs unmerged as it merges, and saves / loads bit-exact
    y = outputs(dm, x, "ab")
    dm.merge()
    assert torch.allclose(logits_of(dm, x), y, atol=1e-5)
    dm.unmerge()
    dm.save(tmp_path / "ab", name="ab")
    assert torch.equal(logits_of(dt.load(tiny_model("bert"), tmp_path / "ab"), x), y)
    # negation forgets: a and its negation together merge back to the base
    dm.add_weighted("neg", ["a"], [-1.0])
    dm.activate("a", "neg")
    dm.merge()
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    dm.unmerge()
    if config.method == "bitfit":  # additive: the body is the base again (a task head copy is
        # replaced by the last delta's, not added: heads combine only inside add_weighted)
        body = [n for n in base if not n.startswith("classifier.")]
        assert all(torch.allclose(after[n], base[n], atol=1e-6) for n in body)
    half = dm.add_weighted("halved", ["a"], [0.5])
    got = merged_weights(dm, "halved")
    assert all(torch.allclose(got[n], base[n] + 0.5 * (wa[n] - base[n]), atol=1e-6) for n in base)
    assert half.config.method == "partial"


def test_dense_combination_keeps_task_heads_and_the_strategies():
    model = tiny_model("bert", task="cls")
    dm = dt.wrap(model, dt.IA3Config(), name="a")
    dm.add("b", dt.IA3Config())
    perturb(dm.get_delta("a"), std=0.05, seed=1)
    perturb(dm.get_delta("b"), std=0.05, seed=2)
    head = model.classifier.weight.detach().clone()
    ha, hb = (dm.get_delta(n).layers["classifier"].values["weight"].detach() for n in ("a", "b"))
    new = dm.add_weighted("m", ["a", "b"], [0.3, 0.7])
    assert torch.allclose(new.layers["classifier"].values["weight"], head + 0.3 * (ha - head) + 0.7 * (hb - head),
                          atol=1e-6)
    base = base_weights(model)
    wa, wb = merged_weights(dm, "a"), merged_weights(dm, "b")
    ties = dm.add_weighted("t", ["a", "b"], [1.0, 1.0], how="ties", density=0.5)
    got = merged_weights(dm, "t")
    n = "bert.encoder.layer.0.attention.self.key.weight"
    t = [(wa[n] - base[n]).double(), (wb[n] - base[n]).double()]
    want = base[n] + merge_utils.ties(t, torch.tensor([1.0, 1.0], dtype=torch.float64), 0.5).float()
    assert torch.allclose(got[n], want, atol=1e-6) and ties.config.method == "partial"
    with pytest.raises(dt.ConfigError, match="rank= is for LoRA"):
        dm.add_weighted("x", ["a", "b"], how="ties", rank=2)
    with pytest.raises(dt.ConfigError, match="how='svd' is unknown"):
        dm.add_weighted("x", ["a", "b"], how="svd")


def test_deltas_that_do_not_fold_into_weights_are_refused():
    dm = dt.wrap(tiny_model("bert"), dt.AdapterConfig(), name="a")
    dm.add("b", dt.AdapterConfig())
    with pytest.raises(dt.MergeError, match="no weighted combination.*composition='average'"):
        dm.add_weighted("x", ["a", "b"])
    dm = dt.wrap(tiny_model("bert"), dt.BitFitConfig(), name="a")
    with pytest.raises(dt.ConfigError, match="'half' is the name of a torch.nn.Module attribute"):
        dm.add_weighted("half", ["a"], [0.5])
    with pytest.raises(dt.MergeError, match="changes no base tensor"):
        dm.add_weighted("x", ["a"], [0.0])  # an untrained BitFit delta (zero) adds nothing
