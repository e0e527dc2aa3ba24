import pytest
import torch

import deltatune as dt
from deltatune.errors import ConfigError, DeltaNotFoundError, MergeError
from deltatune.models import logits_of, tiny_inputs, tiny_model


def perturb(delta, std=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


CONFIGS = {
    "lora": dt.LoRAConfig(r=4),
    "rslora": dt.LoRAConfig(r=4, rslora=True, dropout=0.1),
    "dora": dt.LoRAConfig(r=4, dora=True),
    "bitfit": dt.BitFitConfig(),
    "layernorm": dt.LayerNormConfig(),
    "partial": dt.PartialConfig(last_k=1),
}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_identity_at_init_merge_unmerge(arch, kind):
    model = tiny_model(arch)
    if arch in ("llama", "t5") and kind == "bitfit":  # no bias terms: refused when built
        with pytest.raises(dt.DeltaError, match="has no bias parameters.*'layernorm'"):
            dt.wrap(model, CONFIGS[kind])
        return
    x = tiny_inputs(model)
    base = logits_of(model, x)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    dm = dt.wrap(model, CONFIGS[kind])
    assert torch.allclose(logits_of(dm, x), base, atol=1e-6, rtol=0)
    perturb(dm.get_delta("default"), std=0.05)
    tuned = logits_of(dm, x)
    assert (tuned - base).abs().max() > 1e-3
    with dm.disabled():
        assert torch.equal(logits_of(dm, x), base)
    dm.merge()
    assert torch.allclose(logits_of(dm, x), tuned, atol=1e-5, rtol=0)
    dm.unmerge()
    for k, v in model.state_dict().items():
        assert torch.allclose(v, weights[k], atol=1e-6, rtol=0), k
    assert torch.allclose(logits_of(dm, x), tuned, atol=1e-5, rtol=0)
    with dm.disabled():
        assert torch.allclose(logits_of(dm, x), base, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch_", ["llama", "t5"])
def test_bitfit_without_biases_names_the_problem(arch_):
    with pytest.raises(dt.TargetError, match="bias"):
        dt.wrap(tiny_model(arch_), dt.BitFitConfig())


def test_only_delta_parameters_train(arch):
    model = tiny_model(arch, task="cls")
    x = tiny_inputs(model)
    x.pop("decoder_input_ids", None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dm = dt.wrap(model, dt.LoRAConfig(r=4))
    trainable = {n for n, p in dm.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("delta_modules.default.") for n in trainable)
    dm.train()
    opt = torch.optim.SGD(dm.trainable_parameters(), lr=0.5)
    for _ in range(2):
        loss = dm(**x, labels=torch.tensor([0, 1])).loss
        loss.backward()
        for n, p in dm.named_parameters():
            assert (p.grad is not None) == (n in trainable) or p.grad is None, n
        opt.step()
        opt.zero_grad()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    changed = [n for n, p in dm.get_delta("default").named_parameters() if p.abs().sum() > 0]
    assert any("lora_B" in n for n in changed)
    # the fresh head is trained through its copy
    assert any("values" in n for n, p in dm.get_delta("default").named_parameters())


def test_two_named_deltas(arch):
    model = tiny_model(arch)
    x = tiny_inputs(model)
    base = logits_of(model, x)
    dm = dt.wrap(model, dt.LoRAConfig(r=2), name="a")
    dm.add("b", dt.LoRAConfig(r=2, targets=None, layers=[0]))
    assert dm.deltas == ["a", "b"] and dm.active == ("a",)
    perturb(dm.get_delta("a"), seed=1)
    perturb(dm.get_delta("b"), seed=2)
    ya = logits_of(dm, x)
    dm.activate("b")
    yb = logits_of(dm, x)
    dm.activate("a", "b")
    yab = logits_of(dm, x)
    # LoRA deltas add: both == a + b - base (up to float error), and each differs from the base
    assert (ya - base).abs().max() > 1e-3 and (yb - base).abs().max() > 1e-3
    with dm.disabled():
        assert torch.equal(logits_of(dm, x), base)
    assert dm.active == ("a", "b")
    dm.remove("a")
    assert dm.deltas == ["b"] and dm.active == ("b",)
    assert torch.allclose(logits_of(dm, x), yb, atol=1e-6)
    assert not torch.allclose(yab, ya, atol=1e-4)


def test_lora_deltas_on_disjoint_modules_add_exactly():
    model = tiny_model("bert")
    x = tiny_inputs(model)
    base = logits_of(model, x)
    dm = dt.wrap(model, dt.LoRAConfig(r=2, targets=["query"], modules_to_save=[]), name="a")
    dm.add("b", dt.LoRAConfig(r=2, targets=["value"], modules_to_save=[]))
    perturb(dm.get_delta("a"), seed=1)
    perturb(dm.get_delta("b"), seed=2)
    dm.activate("a", "b")
    both = logits_of(dm, x)
    dm.merge("a")
    dm.activate("a", "b")
    assert torch.allclose(logits_of(dm, x), both, atol=1e-5)
    dm.unmerge()
    assert not torch.allclose(both, base)


def test_errors_for_names_and_merging():
    model = tiny_model("bert")
    dm = dt.wrap(model, dt.LoRAConfig())
    with pytest.raises(DeltaNotFoundError, match="no delta named 'defualt'.*Did you mean: default"):
        dm.activate("defualt")
    with pytest.raises(ConfigError, match="exists already"):
        dm.add("default", dt.LoRAConfig())
    with pytest.raises(ConfigError, match="name"):
        dm.add("a.b", dt.LoRAConfig())
    dm.merge()
    with pytest.raises(MergeError, match="merged already"):
        dm.merge("default")
    with pytest.raises(MergeError, match="unmerge"):
        with dm.disabled():
            pass
    with pytest.raises(MergeError, match="unmerge"):
        dm.remove("default")
    dm.unmerge()
    dm.remove("default")
    assert dm.deltas == []


def test_unwrap_returns_plain_module(arch):
    model = tiny_model(arch)
    x = tiny_inputs(model)
    base = logits_of(model, x)
    keys = list(model.state_dict())
    dm = dt.wrap(model, dt.LoRAConfig(r=2))
    assert list(model.state_dict()) == keys  # hooks, not replacements: the base keys are untouched
    perturb(dm.get_delta("default"))
    tuned = logits_of(dm, x)
    plain = dm.unwrap(merge=True)
    assert plain is model and not model._forward_hooks and not model._forward_pre_hooks
    assert torch.allclose(logits_of(plain, x), tuned, atol=1e-5)
    assert not torch.allclose(logits_of(plain, x), base, atol=1e-4)
    dm2 = dt.wrap(tiny_model(arch), dt.LoRAConfig(r=2))
    assert torch.equal(logits_of(dm2.unwrap(), x), base)


def test_forwards_attributes_and_generate():
    model = tiny_model("gpt2")
    dm = dt.wrap(model, dt.LoRAConfig(r=2))
    assert dm.config is model.config
    ids = torch.tensor([[5, 6, 7]])
    out = dm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                      do_sample=False, pad_token_id=0)
    with dm.disabled():
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                             do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)  # identity at init


def test_summary_counts():
    model = tiny_model("bert")
    dm = dt.wrap(model, dt.LoRAConfig(r=4, targets=["query"], modules_to_save=[]))
    rows = dm.summary()
    expected = 2 * (4 * 32 + 32 * 4)
    assert rows[0]["trainable"] == expected and rows[0]["method"] == "lora"
    base = sum(p.numel() for p in model.parameters())
    assert rows[0]["percent"] == pytest.approx(100 * expected / base)
    assert rows[0]["disk_bytes"] > expected * 4
    assert "lora" in str(rows)


def test_step_and_regularization_defaults():
    dm = dt.wrap(tiny_model("bert"), dt.LoRAConfig())
    assert dm.regularization() == 0.0
    dm.step(0)


def test_per_example_deltas_match_one_by_one(arch):
    model = tiny_model(arch)
    x = tiny_inputs(model, batch=5)
    dm = dt.wrap(model, dt.LoRAConfig(r=2), name="a")
    dm.add("b", dt.LoRAConfig(r=3, targets=None))
    perturb(dm.get_delta("a"), std=0.1, seed=1)
    perturb(dm.get_delta("b"), std=0.1, seed=2)
    names = ["a", "b", None, "b", "a"]
    mixed = dm(**x, deltas=names).logits
    for i, n in enumerate(names):
        one = {k: v[i:i + 1] for k, v in x.items()}
        if n is None:
            with dm.disabled():
                want = logits_of(dm, one)
        else:
            dm.activate(n)
            want = logits_of(dm, one)
        assert torch.allclose(mixed[i:i + 1], want, atol=1e-5), (i, n)
    assert dm.active == ("a",)  # the last activate() above; per_example left no trace


def test_per_example_runs_weight_swapping_methods_on_their_rows():
    model = tiny_model("bert")
    x = tiny_inputs(model, batch=3)
    dm = dt.wrap(model, dt.BitFitConfig(), name="bias")
    dm.add("lora", dt.LoRAConfig(r=2))
    perturb(dm.get_delta("bias"), seed=3)
    perturb(dm.get_delta("lora"), seed=4)
    names = ["bias", "lora", "bias"]
    mixed = dm(**x, deltas=names).logits
    for i, n in enumerate(names):
        dm.activate(n)
        assert torch.allclose(mixed[i:i + 1], logits_of(dm, {k: v[i:i + 1] for k, v in x.items()}), atol=1e-5)
