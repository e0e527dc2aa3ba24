"""Compositions of deltas (stack / parallel / average / fuse) and weighted LoRA combination."""
import pytest
import torch

import deltatune as dt
from deltatune.core.delta import path_to_key
from deltatune.models import logits_of, tiny_inputs, tiny_model


def perturb(module, std=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def two_adapters(arch, heads=False, second="parallel"):
    model = tiny_model(arch, task="cls" if heads else "auto")
    keep = None if heads else []
    dm = dt.wrap(model, dt.AdapterConfig(modules_to_save=keep), name="a")
    dm.add("b", dt.AdapterConfig(placement=second, modules_to_save=keep))
    perturb(dm.get_delta("a"), seed=1)
    perturb(dm.get_delta("b"), seed=2)
    return dm, tiny_inputs(model)


def outputs(dm, x, *names):
    dm.activate(*names)
    return logits_of(dm, x)


def test_stack_equals_applying_in_sequence_by_hand():
    dm, x = two_adapters("bert", second="houlsby")
    dm.activate("a", "b")
    got = logits_of(dm, x)
    ref = tiny_model("bert")
    for path in dm.get_delta("a").paths():
        nets = [dm.get_delta(n).layers[path_to_key(path)].adapter for n in ("a", "b")]

        def hook(m, args, y, nets=nets):
            for net in nets:
                y = y + net.up(torch.relu(net.down(y)))
            return y
        ref.get_submodule(path).register_forward_hook(hook)
    assert torch.allclose(logits_of(ref, x), got, atol=1e-6)
    assert not torch.allclose(got, outputs(dm, x, "b", "a"), atol=1e-5)  # the order matters
    assert dm.composition == dt.Stack("b", "a")


def test_parallel_concatenates_each_members_output(arch):
    dm, x = two_adapters(arch)
    ya, yb = outputs(dm, x, "a"), outputs(dm, x, "b")
    dm.activate("a", "b", composition="parallel")
    both = logits_of(dm, x)
    n = ya.shape[0]
    assert both.shape[0] == 2 * n
    assert torch.allclose(both[:n], ya, atol=1e-6) and torch.allclose(both[n:], yb, atol=1e-6)
    assert dm.active == ("a", "b") and isinstance(dm.composition, dt.Parallel)
    dm.activate("a")
    assert logits_of(dm, x).shape[0] == n  # the replication hook is gone


def test_parallel_heads_and_weight_swapping_members():
    """Each member keeps its own task head (a weight-swapping layer) and LoRA; labels replicate."""
    model = tiny_model("bert", task="cls")
    x = tiny_inputs(model)
    dm = dt.wrap(model, dt.AdapterConfig(), name="a")
    dm.add("b", dt.LoRAConfig(r=2))
    dm.add("c", dt.BitFitConfig())
    for i, n in enumerate(("a", "b", "c")):
        perturb(dm.get_delta(n), seed=i)
    singles = [outputs(dm, x, n) for n in ("a", "b", "c")]
    dm.activate(dt.Parallel("a", "b", "c"))
    out = dm(**x, labels=torch.tensor([0, 1]))
    assert torch.allclose(out.logits, torch.cat(singles), atol=1e-6)
    assert out.loss.ndim == 0


def test_average_of_lora_deltas_is_their_weighted_linear_combination():
    model = tiny_model("gpt2")
    x = tiny_inputs(model)
    dm = dt.wrap(model, dt.LoRAConfig(r=2, targets=["c_attn", "c_fc"]), name="a")
    dm.add("b", dt.LoRAConfig(r=3, targets=["c_attn", "c_proj"]))
    perturb(dm.get_delta("a"), seed=1)
    perturb(dm.get_delta("b"), seed=2)
    dm.activate("a", "b", composition="average", weights=[3, 1])
    avg = logits_of(dm, x)
    dm.add_weighted("merged", ["a", "b"], [0.75, 0.25])
    assert torch.allclose(outputs(dm, x, "merged"), avg, atol=1e-5)
    dm.activate(dt.Average("a", "b", weights=[1, 0]))
    assert torch.equal(logits_of(dm, x), outputs(dm, x, "a"))


@pytest.mark.parametrize("copies", [1, 2])
def test_fusion_of_one_adapter_with_itself_is_that_adapter(tmp_path, arch, copies):
    dm, x = two_adapters(arch, second="houlsby")
    want = outputs(dm, x, "a")
    members = ["a"]
    if copies == 2:
        dm.save(tmp_path / "a", name="a")
        dt.load(dm, tmp_path / "a", name="a2")
        members.append("a2")
    dm.add("f", dt.FusionConfig(placement="houlsby", modules_to_save=[]))
    assert dm.active == tuple(members[-1:])  # adding a fusion does not activate it
    perturb(dm.get_delta("f").layers, std=0.5)  # any query / key
    with torch.no_grad():
        for layer in dm.get_delta("f").layers.values():
            layer.value.weight.copy_(torch.eye(32))
    dm.activate(*members, composition="fuse", fusion="f")
    assert torch.allclose(logits_of(dm, x), want, atol=1e-6)
    dm.activate("a", "b", composition="fuse", fusion="f")
    assert not torch.allclose(logits_of(dm, x), want, atol=1e-4)


def test_fusion_trains_only_the_fusion_and_regularizes_value():
    model = tiny_model("bert", task="cls")
    x = tiny_inputs(model)
    dm = dt.wrap(model, dt.AdapterConfig(placement="pfeiffer"), name="a")
    dm.add("b", dt.AdapterConfig(placement="pfeiffer"))
    dm.add("f", dt.FusionConfig())
    perturb(dm.get_delta("a"), seed=1)
    perturb(dm.get_delta("b"), seed=2)
    dm.activate(dt.Fuse("a", "b", fusion="f"))
    assert dm.regularization() == 0  # V starts at the identity
    dm.train()
    loss = dm(**x, labels=torch.tensor([0, 1])).loss
    loss.backward()
    for n, p in dm.named_parameters():
        assert (p.grad is not None) == n.startswith("delta_modules.f."), n
    assert {id(p) for p in dm.trainable_parameters()} == {id(p) for p in dm.get_delta("f").parameters()}
    with torch.no_grad():
        for layer in dm.get_delta("f").layers.values():
            if hasattr(layer, "value"):
                layer.value.weight.add_(0.1)
    assert dm.regularization().item() == pytest.approx(0.01 * 2 * 32 * 32 * 0.01, rel=1e-4)
    dm.activate("a")  # the members train again outside the fusion
    assert all(p.requires_grad for p in dm.get_delta("a").parameters())


def test_fusion_head_replaces_the_members_heads():
    model = tiny_model("bert", task="cls")
    x = tiny_inputs(model)
    dm = dt.wrap(model, dt.AdapterConfig(), name="a")
    perturb(dm.get_delta("a"))
    want = logits_of(dm, x)
    dm.add("f", dt.FusionConfig(placement="houlsby"))
    with torch.no_grad():
        f_head, a_head = dm.get_delta("f").layers["classifier"], dm.get_delta("a").layers["classifier"]
        for k, v in f_head.values.items():
            v.copy_(a_head.values[k])
    dm.activate("a", composition="fuse", fusion="f")
    assert torch.allclose(logits_of(dm, x), want, atol=1e-6)


def test_nested_compositions():
    dm, x = two_adapters("gpt2")
    dm.add("c", dt.LoRAConfig(r=2))
    perturb(dm.get_delta("c"), seed=3)
    dm.activate(dt.Parallel(dt.Stack("a", "c"), "b"))
    out = logits_of(dm, x)
    assert torch.allclose(out[:2], outputs(dm, x, "a", "c"), atol=1e-6)
    dm.activate(dt.Average(dt.Stack("a", "c"), "b", weights=[1, 0]))
    assert torch.equal(logits_of(dm, x), outputs(dm, x, "a", "c"))


def test_composition_errors():
    dm, x = two_adapters("bert")
    dm.add("f", dt.FusionConfig())  # pfeiffer: no layer after attention, where "a" acts
    with pytest.raises(dt.ConfigError, match="cannot run by itself.*fusion='f'"):
        dm.activate("f")
    with pytest.raises(dt.ConfigError, match="fusion="):
        dm.activate("a", "b", composition="fuse")
    with pytest.raises(dt.ConfigError, match="method 'fusion'"):
        dm.activate("a", composition="fuse", fusion="b")
    with pytest.raises(dt.ConfigError, match="twice"):
        dm.activate("a", "a")
    with pytest.raises(dt.ConfigError, match="outermost"):
        dt.Stack("a", dt.Parallel("a", "b"))
    with pytest.raises(dt.ConfigError, match="one of stack, parallel, average, fuse"):
        dm.activate("a", composition="sum")
    with pytest.raises(dt.ConfigError, match="weights"):
        dm.activate("a", "b", composition="average", weights=[1])
    dm.activate("a", "b", composition="fuse", fusion="f")
    with pytest.raises(dt.ConfigError, match="no layer at .*attention.output.dense.*placement='houlsby'"):
        logits_of(dm, x)
    with pytest.raises(dt.MergeError, match="Fuse"):
        dm.merge("a")
    dm.remove("b")
    assert dm.active == () and dm.composition == dt.Stack()


def test_composition_saved_and_loaded(tmp_path):
    dm, x = two_adapters("t5", second="houlsby")
    dm.add("f", dt.FusionConfig(placement="houlsby"))
    perturb(dm.get_delta("f").layers, std=0.05, seed=4)
    dm.activate("a", "b", composition="fuse", fusion="f")
    want = logits_of(dm, x)
    dm.save(tmp_path / "all")
    loaded = dt.load(tiny_model("t5"), tmp_path / "all")
    assert loaded.composition == dt.Fuse("a", "b", fusion="f")
    assert torch.equal(logits_of(loaded, x), want)
    only = dt.load(tiny_model("t5"), tmp_path / "all", name="f")  # a fusion alone stays inactive
    assert only.deltas == ["f"] and only.active == ()


# -- weighted combination of LoRA deltas ---------------------------------------------------------
def lora_pair(arch="bert"):
    model = tiny_model(arch)
    x = tiny_inputs(model)
    dm = dt.wrap(model, dt.LoRAConfig(r=2, modules_to_save=[]), name="a")
    dm.add("b", dt.LoRAConfig(r=3, targets=["query", "key"], rslora=True, modules_to_save=[],
                              rank_pattern={r"layer\.1\..*key": 1}))
    perturb(dm.get_delta("a"), seed=1)
    perturb(dm.get_delta("b"), seed=2)
    return dm, x


def updates(delta):
    return {p: layer.update() for p, layer in zip(delta.paths(), delta.layers.values())}


def dense_sum(dm, names, weights):
    total = {}
    for n, w in zip(names, weights):
        for p, u in updates(dm.get_delta(n)).items():
            total[p] = total.get(p, 0) + w * u
    return total


def test_weighted_linear_is_exact_and_svd_is_the_truncated_svd(tmp_path):
    dm, x = lora_pair()
    want = dense_sum(dm, ["a", "b"], [0.5, 2.0])
    lin = dm.add_weighted("lin", ["a", "b"], [0.5, 2.0])
    assert lin.config.r == 5 and dm.active == ("a",)  # added inactive
    ranks = {p: layer.lora_A.shape[0] for p, layer in zip(lin.paths(), lin.layers.values())}
    assert ranks["bert.encoder.layer.0.attention.self.query"] == 5  # 2 + 3: every factor kept
    assert ranks["bert.encoder.layer.0.attention.self.value"] == 2
    assert ranks["bert.encoder.layer.1.attention.self.key"] == 1
    for p, u in updates(lin).items():
        assert torch.allclose(u, want[p], atol=1e-6), p
    y = outputs(dm, x, "lin")
    dm.save(tmp_path / "lin", name="lin")
    assert torch.equal(logits_of(dt.load(tiny_model("bert"), tmp_path / "lin"), x), y)
    full = dm.add_weighted("svd5", ["a", "b"], [0.5, 2.0], how="svd", rank=5)
    assert all(torch.allclose(u, want[p], atol=1e-5) for p, u in updates(full).items())
    low = dm.add_weighted("svd1", ["a", "b"], [0.5, 2.0], how="svd", rank=1)
    for p, u in updates(low).items():
        uu, s, vh = torch.linalg.svd(want[p].double())
        assert torch.allclose(u.double(), s[0] * uu[:, :1] @ vh[:1], atol=1e-5), p
    lin_out = outputs(dm, x, "lin")
    dm.add_weighted("unit", ["a", "b"])  # LoRA deltas add: the stack equals the unit-weight merge
    assert torch.allclose(outputs(dm, x, "unit"), outputs(dm, x, "a", "b"), atol=1e-5)
    assert not torch.allclose(lin_out, outputs(dm, x, "unit"), atol=1e-4)


def test_weighted_ties_and_dare_follow_their_definitions():
    dm, _ = lora_pair()
    w = [1.0, 0.5]
    ties = dm.add_weighted("ties", ["a", "b"], w, how="ties", density=0.3, rank=32)  # TIES is dense
    path = "bert.encoder.layer.0.attention.self.query"
    t = torch.stack([updates(dm.get_delta(n))[path].double() for n in ("a", "b")])
    k = int(0.3 * t[0].numel())
    trimmed = torch.stack([torch.where(ti.abs() >= ti.abs().flatten().topk(k).values[-1], ti, 0) for ti in t])
    sign = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    agree = (trimmed.sign() == sign).double()
    want = (torch.tensor(w).view(2, 1, 1) * trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    assert torch.allclose(updates(ties)[path].double(), want, atol=1e-5)
    dense = dense_sum(dm, ["a", "b"], w)
    dare1 = dm.add_weighted("dare1", ["a", "b"], w, how="dare", density=1.0, rank=5)
    assert all(torch.allclose(u, dense[p], atol=1e-5) for p, u in updates(dare1).items())
    d1 = dm.add_weighted("d1", ["a", "b"], w, how="dare", density=0.5, rank=5, seed=7)
    d2 = dm.add_weighted("d2", ["a", "b"], w, how="dare", density=0.5, rank=5, seed=7)
    assert all(torch.equal(u, updates(d2)[p]) for p, u in updates(d1).items())
    assert not torch.allclose(updates(d1)[path], dense[path], atol=1e-4)


def test_weighted_heads_save_load_and_errors(tmp_path):
    model = tiny_model("bert", task="cls")
    x = tiny_inputs(model)
    dm = dt.wrap(model, dt.LoRAConfig(r=2), name="a")
    dm.add("b", dt.LoRAConfig(r=2))
    perturb(dm.get_delta("a"), seed=1)
    perturb(dm.get_delta("b"), seed=2)
    m = dm.add_weighted("m", ["a", "b"], [0.3, 0.7])
    base = model.classifier.weight
    heads = [dm.get_delta(n).layers["classifier"].values["weight"] for n in ("a", "b")]
    want = base + 0.3 * (heads[0] - base) + 0.7 * (heads[1] - base)
    assert torch.allclose(m.layers["classifier"].values["weight"], want, atol=1e-6)
    dm.activate("m")
    y = logits_of(dm, x)
    dm.save(tmp_path / "m", name="m")
    assert torch.equal(logits_of(dt.load(tiny_model("bert", task="cls"), tmp_path / "m"), x), y)
    dm.add("dora", dt.LoRAConfig(r=2, dora=True))
    dm.add("ad", dt.AdapterConfig())
    with pytest.raises(dt.MergeError, match="DoRA"):
        dm.add_weighted("x", ["a", "dora"])
    with pytest.raises(dt.MergeError, match="one method"):
        dm.add_weighted("x", ["a", "ad"])
    with pytest.raises(dt.MergeError, match="no weighted combination"):
        dm.add_weighted("x", ["ad"])
    with pytest.raises(dt.ConfigError, match="how="):
        dm.add_weighted("x", ["a", "b"], how="mean")
    with pytest.raises(dt.ConfigError, match="rank= applies"):
        dm.add_weighted("x", ["a", "b"], rank=2)
    with pytest.raises(dt.ConfigError, match="exists already"):
        dm.add_weighted("m", ["a", "b"])
