"""DyLoRA (rank sampled per step, trained by truncation, any rank at inference) and LoRA-FA (A frozen
at its random init, only B trained, no stored input for A's gradient)."""
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import deltatune as dt
from deltatune.core.delta import path_to_key
from deltatune.core.model import UNSTEPPED_CALLS
from deltatune.methods.dylora import DyLoRAConfig
from deltatune.methods.lora_fa import LoRAFAConfig
from deltatune.models import logits_of, tiny_inputs, tiny_model
from realrun import accuracy, batches, finetune
from roundtrip import reload_bit_exact


def perturb(delta, std=0.05, seed=0, names=("lora_A", "lora_B")):
    """Random values on the factors (B starts at zero: the update would be nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, t in delta.state_dict().items():
            if n.rsplit(".", 1)[-1] in names:
                t.add_(torch.randn(t.shape, generator=g).to(t.dtype) * std)


def train(dm, model, steps, lr=1e-2):
    x = tiny_inputs(model, batch=4, seed=3)
    labels = torch.tensor([0, 1, 1, 0])  # a classifier (tiny BERT)
    opt = torch.optim.AdamW(dm.trainable_parameters(), lr=lr)
    dm.train()
    for i in range(steps):
        dm(**x, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dm.step(i)
    dm.eval()
    return x


# -- DyLoRA ------------------------------------------------------------------------------------------
def test_dylora_identity_merge_at_every_rank_and_exact_unmerge(arch):
    model = tiny_model(arch)
    x = tiny_inputs(model)
    base = logits_of(model, x)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    dm = dt.wrap(model, DyLoRAConfig(r=4, alpha=8))
    assert torch.allclose(logits_of(dm, x), base, atol=1e-6, rtol=0)
    delta = dm.get_delta("default")
    perturb(delta)
    outs = {}
    for b in (1, 2, 4):
        delta.set_rank(b)
        outs[b] = logits_of(dm, x)
        dm.merge()
        assert torch.allclose(logits_of(dm, x), outs[b], atol=1e-5, rtol=0), b
        dm.unmerge()
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert (outs[1] - outs[4]).abs().max() > 1e-4  # the rank matters
    delta.set_rank(2)  # a non-exact merge subtracts what it added, at the rank it merged
    dm.merge(exact=False)
    assert torch.allclose(logits_of(dm, x), outs[2], atol=1e-5, rtol=0)
    dm.unmerge()
    assert all(torch.allclose(v, weights[k], atol=1e-6) for k, v in model.state_dict().items())


def test_dylora_rank_b_is_plain_lora_with_truncated_factors():
    """Eval forward at rank b, and the training forward at a sampled rank b, equal a LoRA of rank b
    (same alpha, so the same alpha / b) holding A[:b], B[:, :b]."""
    model = tiny_model("bert")
    x = tiny_inputs(model)
    dm = dt.wrap(model, DyLoRAConfig(r=6, alpha=12, modules_to_save=[]))
    delta = dm.get_delta("default")
    perturb(delta)
    for b in (2, 5):
        delta.set_rank(b)
        want = logits_of(dm, x)
        lora = dt.wrap(tiny_model("bert"), dt.LoRAConfig(r=b, alpha=12, modules_to_save=[]))
        with torch.no_grad():
            for key, layer in lora.get_delta("default").layers.items():
                src = delta.layers[key]
                layer.lora_A.copy_(src.lora_A[:b])
                layer.lora_B.copy_(src.lora_B[:, :b])
        assert torch.allclose(logits_of(lora, x), want, atol=1e-6, rtol=0), b
        # the training forward of one layer at sampled rank b (frozen or not: same values)
        key = next(iter(delta.layers))
        layer, ref = delta.layers[key], lora.get_delta("default").layers[key]
        h = torch.randn(3, 32)
        layer.train()
        layer.train_rank = b
        assert torch.allclose(layer.low_rank(h), ref.low_rank(h), atol=1e-6, rtol=0)
        layer.eval()


@pytest.mark.parametrize("frozen", [True, False])
def test_dylora_trains_the_sampled_rank_only(frozen):
    """frozen (the paper's default): only row b of A and column b of B get gradients; else rows /
    columns 1..b; never those past b."""
    lin = nn.Linear(8, 6)
    dm = dt.wrap(nn.Sequential(lin), DyLoRAConfig(r=5, frozen=frozen, targets=["0"]))
    layer = dm.get_delta("default").layers["0"]
    with torch.no_grad():
        layer.lora_B.normal_()
    dm.train()
    layer.train_rank = 3
    dm(torch.randn(4, 8)).sum().backward()
    rows_a = (layer.lora_A.grad.abs().sum(1) > 0).tolist()
    cols_b = (layer.lora_B.grad.abs().sum(0) > 0).tolist()
    want = [False, False, True, False, False] if frozen else [True, True, True, False, False]
    assert rows_a == want and cols_b == want
    assert lin.weight.grad is None and lin.bias.grad is None


def test_dylora_rank_sequence_is_seeded_and_driven_by_step():
    model = tiny_model("bert")
    cfg = DyLoRAConfig(r=6, r_min=2, seed=7)
    d1 = dt.wrap(model, cfg).get_delta("default")
    d2 = dt.wrap(tiny_model("bert"), cfg).get_delta("default")
    d3 = dt.wrap(tiny_model("bert"), cfg.replace(seed=8)).get_delta("default")
    seq = [d1.sample_rank(i) for i in range(300)]
    assert seq == [d2.sample_rank(i) for i in range(300)]
    assert seq != [d3.sample_rank(i) for i in range(300)]
    assert set(seq) == {2, 3, 4, 5, 6}  # the whole range [r_min, r], nothing outside it
    assert all(35 < seq.count(b) < 85 for b in range(2, 7))  # uniform: 60 each expected (sd 7)
    assert d1.training_rank == seq[0]
    dm = dt.wrap(tiny_model("bert"), cfg)
    delta = dm.get_delta("default")
    seen = []
    x = tiny_inputs(dm.model)
    dm.train()
    for i in range(5):
        seen.append(delta.training_rank)
        assert all(lay.train_rank == seen[-1] for lay in delta.dylora_layers())
        dm(**x, labels=torch.tensor([0, 1])).loss.backward()
        dm.step(i)
    assert seen == seq[:5]
    dm.eval()
    assert delta.rank == 6 and all(lay.current_rank() == 6 for lay in delta.dylora_layers())


def test_dylora_without_dm_step_is_refused():
    """Training calls without dm.step() would keep one rank for the whole run: refused."""
    dm = dt.wrap(tiny_model("bert"), DyLoRAConfig(r=4))
    x = tiny_inputs(dm.model)
    dm.train()
    with pytest.raises(dt.ConfigError, match=r"dm\.step\(\) was never called.*dylora"):
        for _ in range(UNSTEPPED_CALLS + 1):
            dm(**x)


def test_dylora_trains_only_the_delta_and_round_trips(tmp_path):
    model = tiny_model("bert")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    dm = dt.wrap(model, DyLoRAConfig(r=4, rank=3))
    delta = dm.get_delta("default")
    train(dm, model, 6)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert any(lay.lora_B.abs().sum() > 0 for lay in delta.dylora_layers())
    delta.set_rank(2)  # set after training: the saved delta evaluates at 2, and resumes the sequence
    loaded = reload_bit_exact(dm, "bert", tmp_path)
    ld = loaded.get_delta("default")
    assert ld.rank == 2 and ld.config.rank == 3
    assert ld.step_index == delta.step_index == 6 and ld.training_rank == delta.training_rank


@pytest.mark.parametrize("bad, field", [
    (dict(r=4, r_min=5), "r_min"), (dict(r=4, r_min=0), "r_min"), (dict(r=4, rank=5), "rank"),
    (dict(rank=0), "rank"), (dict(dora=True), "dora"), (dict(rank_pattern={"query": 2}), "rank_pattern"),
    (dict(frozen="yes"), "frozen"), (dict(seed=-1), "seed"), (dict(init="xavier"), "init"),
])
def test_dylora_config_errors_name_the_field(bad, field):
    with pytest.raises(dt.ConfigError, match=rf"DyLoRAConfig\.{field}="):
        dt.config_from_dict({"method": "dylora", **bad})


def test_dylora_refusals_name_the_fix():
    dm = dt.wrap(tiny_model("bert"), DyLoRAConfig(r=4))
    delta = dm.get_delta("default")
    with pytest.raises(dt.ConfigError, match=r"set_rank\(5\).*\[1, 4\]"):
        delta.set_rank(5)
    dm.merge()
    with pytest.raises(dt.MergeError, match=r"unmerge\(\) before set_rank"):
        delta.set_rank(2)
    dm.unmerge()
    delta.set_rank(2)
    with pytest.raises(dt.TargetError, match="supports Linear, Conv1D"):
        dt.wrap(tiny_model("gpt2"), DyLoRAConfig(targets=["wte"]))
    dm.add("other", DyLoRAConfig(r=4))
    with pytest.raises(dt.MergeError, match="composition='average'"):
        dm.add_weighted("both", ["default", "other"])


def test_dylora_learns_sst2_at_a_lower_rank():
    """Trained at ranks sampled from [1, 8], evaluated at rank 4 (never a fixed training rank).
    frozen=False here: in a 50-step run the paper's frozen mode trains each of the 8 columns on ~6
    steps only, and ranks 1-4 stay at chance (measured: 0.495 at ranks 1, 2, 4 vs 0.70 at rank 8);
    with every column up to b trained, rank 4 learns as well as rank 8."""
    cfg = DyLoRAConfig(r=8, frozen=False, targets=["query", "value"])
    before, at_r, dm = finetune(cfg, steps=50, lr=5e-3, n_dev=200)
    delta = dm.get_delta("default")
    delta.set_rank(4)
    at_4 = accuracy(dm, batches("dev", 200, 64, 0))
    print(f"DyLoRA SST-2 dev accuracy: untrained {before:.3f} -> rank 8 {at_r:.3f}, rank 4 {at_4:.3f}")
    assert before < 0.6
    assert at_4 >= 0.65 and at_4 >= before + 0.12


# -- LoRA-FA -----------------------------------------------------------------------------------------
def test_lora_fa_identity_merge_and_only_b_trains(arch):
    model = tiny_model(arch)
    x = tiny_inputs(model)
    base = logits_of(model, x)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    dm = dt.wrap(model, LoRAFAConfig(r=4, modules_to_save=[]))
    assert torch.allclose(logits_of(dm, x), base, atol=1e-6, rtol=0)
    delta = dm.get_delta("default")
    a0 = {k: lay.lora_A.clone() for k, lay in delta.layers.items()}
    trainable = dm.trainable_parameters()
    # closed form: B only, d_out * r per module
    assert sum(p.numel() for p in trainable) == sum(lay.lora_B.numel() for lay in delta.layers.values())
    assert all(not lay.lora_A.requires_grad and "lora_A" in dict(lay.named_buffers()) for lay in delta.layers.values())
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    dm.train()
    for _ in range(3):
        ids = torch.randint(3, model.config.vocab_size, x["input_ids"].shape, generator=g)
        out = dm(**{**x, "input_ids": ids})
        out.logits.float().pow(2).mean().backward()
        assert all(p.grad is None for p in model.parameters())
        opt.step()
        opt.zero_grad(set_to_none=True)
    dm.eval()
    assert all(torch.equal(lay.lora_A, a0[k]) for k, lay in delta.layers.items())  # A stays at its init
    assert all(lay.lora_B.abs().sum() > 0 for lay in delta.layers.values())
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    tuned = logits_of(dm, x)
    assert (tuned - base).abs().max() > 1e-5
    dm.merge()
    assert torch.allclose(logits_of(dm, x), tuned, atol=1e-5, rtol=0)
    dm.unmerge()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def saved_activations(dm, run) -> dict[int, tuple[int, torch.dtype, tuple]]:
    """The distinct storages autograd keeps for backward while `run()` builds the graph, leaving
    out the model's and the deltas' own tensors (weights kept anyway): activations only."""
    own = {t.untyped_storage().data_ptr() for t in [*dm.parameters(), *dm.buffers()]}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = (t.untyped_storage().nbytes(), t.dtype, tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run()
    loss.backward()
    return seen


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_fa_keeps_no_input_for_a_gradient(dropout):
    """One layer whose input requires grad (as every adapted layer above the first): LoRA keeps x
    (or dropout(x)) for A's gradient, LoRA-FA does not: only A x, r wide (and dropout's bool mask)."""
    d_in, d_out, r, tokens = 64, 48, 4, 32
    saved = {}
    for method in ("lora", "lora_fa"):
        torch.manual_seed(0)
        dm = dt.wrap(nn.Sequential(nn.Linear(d_in, d_out)),
                     {"method": method, "r": r, "dropout": dropout, "targets": ["0"]})
        dm.train()
        x = torch.randn(tokens, d_in, requires_grad=True)
        saved[method] = saved_activations(dm, lambda: dm(x).sum())
        assert (x.untyped_storage().data_ptr() in saved[method]) == (method == "lora" and dropout == 0)
    wide_float = [s for s in saved["lora_fa"].values() if s[2] == (tokens, d_in) and s[1].is_floating_point]
    assert not wide_float, wide_float  # no d_in-wide float activation kept at all
    total = {m: sum(n for n, _, _ in s.values()) for m, s in saved.items()}
    assert total["lora_fa"] == tokens * r * 4 + (tokens * d_in if dropout else 0)  # A x (+ a bool mask)
    if dropout:  # LoRA keeps the dropped-out fp32 input (and torch's dropout its noise, on CPU)
        assert total["lora"] - total["lora_fa"] >= tokens * d_in * 4
        layer = dm.get_delta("default").layers["0"]  # LoRA-FA's own dropout: x * keep / (1 - p)
        with torch.no_grad():
            layer.lora_B.normal_()
            h = torch.randn(2, d_in)
            draws = [layer.low_rank(h) for _ in range(4000)]
            layer.eval()
            assert not torch.equal(draws[0], draws[1])
            assert torch.allclose(torch.stack(draws).mean(0), layer.low_rank(h), rtol=0.05, atol=0.05)
    else:  # exactly the fp32 input LoRA keeps
        assert total["lora"] - total["lora_fa"] == tokens * d_in * 4


def test_lora_fa_saves_fewer_activation_bytes_on_a_model():
    """Tiny BERT, query and value of both layers: LoRA keeps each layer's attention input once
    (query and value share it), LoRA-FA none: the difference is layers * tokens * hidden floats."""
    totals = {}
    for method in ("lora", "lora_fa"):
        model = tiny_model("bert")
        dm = dt.wrap(model, {"method": method, "r": 4})
        dm.train()
        x = tiny_inputs(model, batch=4, seq=16)
        labels = torch.tensor([0, 1, 1, 0])
        torch.manual_seed(0)
        saved = saved_activations(dm, lambda: dm(**x, labels=labels).loss)
        totals[method] = sum(n for n, _, _ in saved.values())
    layers, tokens, hidden = 2, 4 * 16, 32
    assert totals["lora"] - totals["lora_fa"] == layers * tokens * hidden * 4, totals


def test_lora_fa_round_trip_saves_a(tmp_path):
    model = tiny_model("bert")
    dm = dt.wrap(model, LoRAFAConfig(r=4))
    delta = dm.get_delta("default")
    perturb(delta, names=("lora_B",))
    loaded = reload_bit_exact(dm, "bert", tmp_path)
    meta = json.loads((tmp_path / "d" / "delta_config.json").read_text())
    tensors = load_file(tmp_path / "d" / meta["weights"])
    for path in delta.paths():
        if f"{path}.lora_B" in tensors:
            assert torch.equal(tensors[f"{path}.lora_A"], delta.layers[path_to_key(path)].lora_A)
    ld = loaded.get_delta("default")
    assert not any(n.endswith("lora_A") for n, _ in ld.named_parameters())


@pytest.mark.parametrize("bad, field", [(dict(dora=True), "dora"), (dict(init="xavier"), "init"),
                                        (dict(r=0), "r")])
def test_lora_fa_config_errors_name_the_field(bad, field):
    with pytest.raises(dt.ConfigError, match=rf"LoRAFAConfig\.{field}="):
        dt.config_from_dict({"method": "lora_fa", **bad})


def test_lora_fa_refuses_embeddings():
    with pytest.raises(dt.TargetError, match="supports Linear, Conv1D"):
        dt.wrap(tiny_model("gpt2"), LoRAFAConfig(targets=["wte"]))


def test_lora_fa_learns_sst2_on_real_model():
    before, after, dm = finetune(LoRAFAConfig(r=8, targets=["query", "value"]), steps=50, lr=1e-2, n_dev=200)
    print(f"LoRA-FA SST-2 dev accuracy: untrained {before:.3f} -> {after:.3f}")
    assert before < 0.6
    assert after >= 0.65 and after >= before + 0.1


def test_lora_fa_weighted_combination_stays_lora_fa():
    """add_weighted (LoRA's linear concatenation) of two LoRA-FA deltas: the sum of their updates,
    itself a LoRA-FA delta with a frozen (buffer) A."""
    model = tiny_model("bert")
    x = tiny_inputs(model)
    dm = dt.DeltaModel(model)
    for i, name in enumerate(("a", "b")):
        dm.add(name, LoRAFAConfig(r=2, modules_to_save=[]))
        perturb(dm.get_delta(name), seed=i, names=("lora_B",))
    dm.activate("a", "b")
    both = logits_of(dm, x)
    new = dm.add_weighted("ab", ["a", "b"], [1.0, 1.0])
    dm.activate("ab")
    assert torch.allclose(logits_of(dm, x), both, atol=1e-5, rtol=0)
    assert isinstance(new.config, LoRAFAConfig)
    assert not any(n.endswith("lora_A") for n, _ in new.named_parameters())
