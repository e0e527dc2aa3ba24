"""LoRAPrune (LoRA-gradient-guided structured pruning of heads and FFN channels) and QA-LoRA
(group-pooled LoRA on a group-wise INT base, merged into the zero points without requantization),
with the group-wise INT quantizer QA-LoRA needs (quant/intq.py)."""
import copy

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.methods.loraprune import LoRAPruneConfig, prune_model
from deltatune.methods.qalora import QALoRAConfig
from deltatune.models import logits_of, tiny_inputs, tiny_model
from deltatune.quant import intq
from deltatune.quant.api import quantized_modules
from realrun import batches, finetune
from roundtrip import reload_bit_exact


def inputs(model, **kw):
    """tiny_inputs for the classification models (T5's classifier makes its own decoder ids)."""
    x = tiny_inputs(model, **kw)
    if type(model).__name__.endswith("ForSequenceClassification"):
        x.pop("decoder_input_ids", None)
    return x


def train(dm, model, steps, lr=1e-2, seed=3):
    x = inputs(model, batch=4, seed=seed)
    labels = torch.tensor([0, 1, 1, 0])
    opt = torch.optim.AdamW(dm.trainable_parameters(), lr=lr)
    dm.train()
    for i in range(steps):
        (dm(**x, labels=labels).loss + dm.regularization()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dm.step(i)
    dm.eval()
    return x


def randomize(delta, std=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in delta.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * std)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# == LoRAPrune ========================================================================================
def prune_cfg(**kw):
    return LoRAPruneConfig(**{"r": 4, "total_step": 8, "prune_every": 2, **kw})


def test_loraprune_identity_at_init_and_gradients_only_on_the_delta(arch):
    model = tiny_model(arch, task="cls")
    x = inputs(model)
    base = logits_of(model, x)
    dm = dt.wrap(model, prune_cfg())
    assert torch.allclose(logits_of(dm, x), base, atol=1e-6, rtol=0)
    delta = dm.get_delta("default")
    masks = [n for n, _ in delta.named_buffers() if n.endswith("prune_mask")]
    assert masks and all(not b.requires_grad for _, b in delta.named_buffers())
    dm.train()
    dm(**x, labels=torch.tensor([0, 1])).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    own = {id(p) for p in delta.parameters()}
    assert all(id(p) in own for p in dm.trainable_parameters())


def test_loraprune_groups_cover_heads_and_channels_per_block():
    model = tiny_model("llama", task="cls")  # 4 query heads sharing 2 KV heads, intermediate 64
    delta = dt.wrap(model, prune_cfg()).get_delta("default")
    units = {(u.kind, u.site): u for u in delta.units}
    assert len(units) == 4
    heads = units[("heads", "model.layers.0.self_attn.o_proj")]
    assert heads.groups == 2                            # KV groups: 2 query heads + 1 KV head each
    rows = {p.rsplit(".", 1)[1]: g for p, g, _ in heads.members}
    assert rows["q_proj"].tolist() == [0] * 16 + [1] * 16  # head_dim 8, two query heads per group
    assert rows["k_proj"].tolist() == [0] * 8 + [1] * 8 and torch.equal(rows["v_proj"], rows["k_proj"])
    ffn = units[("channels", "model.layers.1.mlp.down_proj")]
    assert ffn.groups == 64 and {p.rsplit(".", 1)[1] for p, _, _ in ffn.members} == {"down_proj", "up_proj", "gate_proj"}
    gpt2 = dt.wrap(tiny_model("gpt2", task="cls"), prune_cfg()).get_delta("default")
    fused = [g for p, g, s in gpt2.units[0].members if p.endswith("c_attn")][0]
    assert fused.tolist() == (torch.arange(32) // 8).tolist() * 3  # q | k | v of the fused projection


def test_loraprune_schedule_is_cubic_and_ends_at_the_target():
    cfg = LoRAPruneConfig(total_step=100, sparsity=0.5, init_sparsity=0.1, warmup=0.1, cooldown=0.2)
    last = 100 - 1 - 20
    assert cfg.last_step() == last
    assert cfg.sparsity_at(0) == cfg.sparsity_at(10) == 0.1
    for s in range(11, last):
        t = (s - 10) / (last - 10)
        assert cfg.sparsity_at(s) == pytest.approx(0.5 + (0.1 - 0.5) * (1 - t) ** 3)
    values = [cfg.sparsity_at(s) for s in range(100)]
    assert values == sorted(values) and cfg.sparsity_at(last) == cfg.sparsity_at(99) == 0.5


def test_loraprune_criterion_matches_the_formula():
    """I = |(G_B A + B G_A - G_B G_A) ⊙ (W + s B A)|, summed per group, L2-normalised per module,
    summed over the group's modules, then Ī = β Ī + (1 - β) I (from zero)."""
    model = tiny_model("bert", task="cls")
    dm = dt.wrap(model, prune_cfg(total_step=50, beta=0.7))
    delta = dm.get_delta("default")
    randomize(delta)
    x = inputs(model, batch=4)
    dm.train()
    dm(**x, labels=torch.tensor([0, 1, 1, 0])).loss.backward()
    unit = [u for u in delta.units if u.kind == "heads"][0]
    want = torch.zeros(unit.groups)
    for path, groups, is_site in unit.members:
        layer = delta.layers[path.replace(".", "/")]
        a, b, ga, gb = layer.lora_A, layer.lora_B, layer.lora_A.grad, layer.lora_B.grad
        w = model.get_submodule(path).weight
        s = ((gb @ a + b @ ga - gb @ ga) * (w + layer.scaling * b @ a)).abs()
        per = s.sum(0) if is_site else s.sum(1)
        g = torch.zeros(unit.groups).index_add_(0, groups, per.detach())
        want += g / (g.norm() + 1e-8)
    dm.step(0)
    assert torch.allclose(unit.importance, 0.3 * want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("arch_", ["bert", "gpt2", "llama", "t5"])
def test_loraprune_reaches_the_sparsity_masks_only_grow_and_round_trips(arch_, tmp_path):
    model = tiny_model(arch_, task="cls")
    cfg = prune_cfg(total_step=12, sparsity=0.5, warmup=0.2, cooldown=0.2)
    dm = dt.wrap(model, cfg)
    delta = dm.get_delta("default")
    x = inputs(model, batch=4, seed=3)
    labels = torch.tensor([0, 1, 1, 0])
    opt = torch.optim.AdamW(dm.trainable_parameters(), lr=1e-2)
    history = []
    dm.train()
    for i in range(12):
        dm(**x, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dm.step(i)
        history.append({u.site: delta.mask(u).clone() for u in delta.units})
    for before, after in zip(history, history[1:]):
        assert all(not torch.any(after[k] & ~before[k]) for k in before)  # a pruned group stays pruned
    assert any(not m.all() for m in history[cfg.last_step() - 1].values())  # iterative: before the last step
    for unit in delta.units:
        assert int((~delta.mask(unit)).sum()) == int(unit.groups * 0.5)
    assert delta.finalized
    dm.eval()
    tuned = logits_of(dm, x)

    dm.save(tmp_path / "p")
    files = list((tmp_path / "p").rglob("*.safetensors"))
    tensors = {k: v for f in files for k, v in load_file(f).items()}
    saved = {k: v for k, v in tensors.items() if k.endswith("prune_mask")}
    assert len(saved) == len(delta.units) and all(v.dtype == torch.bool and not v.all() for v in saved.values())
    loaded = dt.load(tiny_model(arch_, task="cls"), tmp_path / "p")
    assert torch.equal(logits_of(loaded, x), tuned)
    assert loaded.get_delta("default").pruned() == delta.pruned() and loaded.get_delta("default").finalized


def test_loraprune_masked_head_and_channel_contribute_nothing():
    model = tiny_model("bert", task="cls")
    dm = dt.wrap(model, prune_cfg())
    delta = dm.get_delta("default")
    randomize(delta)
    x = inputs(model)
    heads = [u for u in delta.units if u.kind == "heads" and "layer.0" in u.site][0]
    ffn = [u for u in delta.units if u.kind == "channels" and "layer.0" in u.site][0]
    delta.mask(heads)[1] = False
    delta.mask(ffn)[:10] = False
    want = logits_of(dm, x)
    with torch.no_grad():   # the pruned head's query/key/value rows and channel rows change: no effect
        for module, rows in ((model.bert.encoder.layer[0].attention.self.query, slice(8, 16)),
                             (model.bert.encoder.layer[0].attention.self.value, slice(8, 16)),
                             (model.bert.encoder.layer[0].intermediate.dense, slice(0, 10))):
            module.weight[rows] += 3.0
            module.bias[rows] -= 1.0
    assert torch.allclose(logits_of(dm, x), want, atol=1e-6, rtol=0)


def test_loraprune_importance_prunes_the_dead_head():
    """A head whose base rows / columns are zero gets (near) no importance and is pruned first."""
    model = tiny_model("bert", task="cls")
    attn = model.bert.encoder.layer[0].attention
    with torch.no_grad():
        for m in (attn.self.query, attn.self.key, attn.self.value):
            m.weight[16:24] = 0
            m.bias[16:24] = 0
        attn.output.dense.weight[:, 16:24] = 0
    dm = dt.wrap(model, prune_cfg(total_step=6, sparsity=0.25, prune_every=100, channels=False, layers=[0]))
    train(dm, model, 6, lr=1e-4)
    (unit,) = dm.get_delta("default").units
    assert dm.get_delta("default").mask(unit).tolist() == [True, True, False, True]


def test_loraprune_merge_unmerge_exact():
    model = tiny_model("gpt2", task="cls")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    dm = dt.wrap(model, prune_cfg(total_step=6))
    x = train(dm, model, 6)
    tuned = logits_of(dm, x)
    for exact in (True, False):
        dm.merge(exact=exact)
        assert torch.allclose(logits_of(dm, x), tuned, atol=1e-5, rtol=0)
        pruned = [u for u in dm.get_delta("default").units if u.kind == "channels"][0]
        cut = ~dm.get_delta("default").mask(pruned)
        assert torch.all(model.get_submodule(pruned.site).weight[cut] == 0)  # Conv1D: input rows
        dm.unmerge()
        state = model.state_dict()
        if exact:
            assert all(torch.equal(state[k], weights[k]) for k in weights)
        else:
            assert all(torch.allclose(state[k], weights[k], atol=1e-6) for k in weights)
        assert torch.allclose(logits_of(dm, x), tuned, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch_", ["bert", "gpt2", "llama"])
def test_prune_model_slices_heads_and_channels(arch_):
    model = tiny_model(arch_, task="cls")
    n_before = sum(p.numel() for p in model.parameters())
    dm = dt.wrap(model, prune_cfg(total_step=6))
    x = train(dm, model, 6)
    delta = dm.get_delta("default")
    tuned = logits_of(dm, x)
    pruned = delta.pruned()
    small = prune_model(dm)
    assert small is model and not any(m._forward_hooks or m._forward_pre_hooks for m in small.modules())
    assert torch.allclose(logits_of(small, x), tuned, atol=1e-5, rtol=0)
    n_after = sum(p.numel() for p in small.parameters())
    assert n_after < n_before
    for site, info in pruned.items():
        w = small.get_submodule(site).weight
        fan_in = w.shape[0] if arch_ == "gpt2" else w.shape[1]
        per = {"bert": 8, "gpt2": 8, "llama": 16}[arch_] if info["kind"] == "heads" else 1
        assert fan_in == info["kept"] * per


def test_prune_model_refuses_t5_heads_and_slices_its_channels():
    dm = dt.wrap(tiny_model("t5", task="cls"), prune_cfg(total_step=4))
    train(dm, dm.model, 4)
    with pytest.raises(dt.MergeError, match="relative position bias"):
        prune_model(dm)
    model = tiny_model("t5", task="cls")
    dm = dt.wrap(model, prune_cfg(total_step=4, heads=False))
    x = train(dm, model, 4)
    tuned = logits_of(dm, x)
    small = prune_model(dm)
    assert small.transformer.encoder.block[0].layer[1].DenseReluDense.wo.weight.shape[1] == 32
    assert torch.allclose(logits_of(small, x), tuned, atol=1e-5, rtol=0)


def test_loraprune_config_errors_name_the_field():
    with pytest.raises(dt.ConfigError, match="total_step"):
        dt.wrap(tiny_model("bert"), LoRAPruneConfig())
    for bad, word in ((dict(sparsity=1.0), "sparsity"), (dict(init_sparsity=0.6), "init_sparsity"),
                      (dict(heads=False, channels=False), "heads"), (dict(warmup=0.5, cooldown=0.5), "warmup"),
                      (dict(prune_every=0), "prune_every"), (dict(beta=1.0), "beta"), (dict(dora=True), "dora"),
                      (dict(init="pissa"), "init")):
        with pytest.raises(dt.ConfigError, match=rf"LoRAPruneConfig\.{word}="):
            dt.config_from_dict({"method": "loraprune", "total_step": 5, **bad})
    with pytest.raises(dt.ConfigError, match="channels=False"):
        dt.wrap(tiny_model("bert"), prune_cfg(targets=["query", "value"]))
    dm = dt.wrap(tiny_model("bert"), prune_cfg(total_step=1))
    with pytest.raises(dt.DeltaError, match="backward"):
        dm.step(0)
    with pytest.raises(dt.MergeError, match="weighted"):
        dm.add("b", prune_cfg())
        dm.add_weighted("c", ["default", "b"])


def test_loraprune_learns_sst2_and_prunes_on_the_real_model():
    cfg = LoRAPruneConfig(r=8, total_step=40, sparsity=0.25, warmup=0.1, cooldown=0.3)
    before, after, dm = finetune(cfg, steps=40, lr=2e-3, n_dev=200)
    delta = dm.get_delta("default")
    pruned = delta.pruned()
    heads = [v for v in pruned.values() if v["kind"] == "heads"]
    assert all(v["kept"] == 12 - 3 for v in heads) and len(heads) == 6   # MiniLM: 6 layers x 12 heads
    x = {k: v for k, v in batches("dev", 64, 64, 0)[0].items() if k != "labels"}
    masked = logits_of(dm, x)
    n_base = sum(p.numel() for p in dm.model.parameters())
    small = prune_model(dm)
    sliced = logits_of(small, x)
    n_small = sum(p.numel() for p in small.parameters())
    print(f"LoRAPrune SST-2 dev accuracy: untrained {before:.3f} -> {after:.3f} (25% of heads and channels "
          f"masked); sliced model {n_small / n_base:.3f}x the parameters, max |logit gap| "
          f"{float((sliced - masked).abs().max()):.1e}")
    assert before < 0.6 and after >= 0.65 and after >= before + 0.12
    assert torch.allclose(sliced, masked, atol=1e-4, rtol=0) and n_small < n_base


# == the group-wise INT quantizer =====================================================================
@pytest.mark.parametrize("bits", intq.BITS)
def test_int_quantizer_round_trip_within_half_a_step(bits):
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    codes, scale, zero = intq.quantize_groups(w, bits, 32)
    assert codes.dtype == torch.uint8 and codes.shape == (64, 96 * bits // 8)
    q = intq.unpack(codes, bits)
    assert int(q.max()) <= 2 ** bits - 1 and torch.equal(intq.pack(q, bits), codes)
    d = intq.dequantize_groups(codes, scale, zero, bits, 32)
    step = scale.repeat_interleave(32, dim=1)
    assert torch.all((d - w).abs() <= step / 2 + 1e-6)
    g = w.view(64, 3, 32)
    assert torch.allclose(zero, g.amin(-1)) and torch.allclose(scale, (g.amax(-1) - g.amin(-1)) / (2 ** bits - 1))


def test_int4_base_keeps_modules_and_state_keys_and_moves_like_a_tensor():
    model = tiny_model("gpt2", task="cls")
    x = tiny_inputs(model)
    keys = list(model.state_dict())
    c_attn = model.transformer.h[0].attn.c_attn
    dt.quantize(model, "int4", group_size=16)
    assert model.transformer.h[0].attn.c_attn is c_attn and list(model.state_dict()) == keys
    w = c_attn.weight
    assert dt.quant.is_quantized(w) and w.shape == (32, 96) and isinstance(c_attn, intq.IntConv1D)
    names = quantized_modules(model)
    assert len(names) == 8
    report = dt.memory_report(model)
    assert report.quantized_ratio == pytest.approx((0.5 + 2 * 4 / 16) / 4)
    out = logits_of(model, x)
    twin = copy.deepcopy(model)
    assert torch.equal(logits_of(twin, x), out) and twin.transformer.h[0].attn.c_attn.weight.codes is not w.codes
    model.to("cpu")
    half = copy.deepcopy(model).to(torch.float64)
    assert half.transformer.h[0].attn.c_attn.weight.dtype == torch.float64
    with pytest.raises(NotImplementedError, match="dequantize"):
        w + 1
    dt.dequantize(model)
    assert not quantized_modules(model) and torch.allclose(logits_of(model, x), out, atol=1e-6, rtol=0)


def test_int_quantize_errors():
    with pytest.raises(dt.ConfigError, match="group_size"):
        dt.quantize(tiny_model("llama"), "int4", group_size=3)
    with pytest.raises(dt.ConfigError, match="embeddings"):
        dt.quantize(tiny_model("llama"), "int4", embeddings=True)
    with pytest.raises(dt.ConfigError, match="group_size=48"):
        dt.quantize(tiny_model("llama"), "int4", group_size=48)
    with pytest.raises(dt.ConfigError, match="int4"):
        dt.quantize(tiny_model("llama"), "int5")


# == QA-LoRA ==========================================================================================
def test_qalora_identity_pooled_forward_and_parameter_count(arch):
    model = tiny_model(arch)
    x = tiny_inputs(model)
    base = logits_of(model, x)
    dm = dt.wrap(model, QALoRAConfig(r=4, group_size=8, modules_to_save=[]))
    assert torch.allclose(logits_of(dm, x), base, atol=1e-6, rtol=0)
    delta = dm.get_delta("default")
    layer = next(iter(delta.layers.values()))
    assert layer.lora_A.shape == (4, 32 // 8)
    n = sum(lay.lora_A.numel() + lay.lora_B.numel() for lay in delta.layers.values())
    assert n == sum(4 * (32 // 8) + lay.lora_B.shape[0] * 4 for lay in delta.layers.values())
    randomize(delta, std=0.3)
    h = torch.randn(3, 32)
    pooled = h.view(3, 4, 8).mean(-1)
    want = layer.scaling * pooled @ layer.lora_A.T @ layer.lora_B.T
    assert torch.allclose(layer.low_rank(h), want, atol=1e-6)
    assert torch.allclose(h @ layer.update().T, want, atol=1e-6)  # ΔW: the group constants / L, repeated


def test_qalora_merge_into_a_dense_base_is_exact(arch, tmp_path):
    model = tiny_model(arch)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    dm = dt.wrap(model, QALoRAConfig(r=4, group_size=16))
    randomize(dm.get_delta("default"), std=0.3)
    x = tiny_inputs(model)
    tuned = logits_of(dm, x)
    reload_bit_exact(dm, arch, tmp_path)
    dm.merge()
    assert torch.allclose(logits_of(dm, x), tuned, atol=1e-5, rtol=0)
    dm.unmerge()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch_", ["llama", "gpt2"])
def test_qalora_merge_stays_int4_without_requantization_error(arch_):
    """Merged: same codes, same scales, new zero points; outputs equal the unmerged ones to float
    rounding. Plain LoRA merged into the same base must be requantized: measured, far larger."""
    model = tiny_model(arch_, task="cls")
    dt.quantize(model, "int4", group_size=16)
    x = tiny_inputs(model)
    ref = copy.deepcopy(model)
    dm = dt.wrap(model, QALoRAConfig(r=4))          # group_size None: the base's 16
    delta = dm.get_delta("default")
    assert all(lay.group == 16 for k, lay in delta.layers.items() if hasattr(lay, "group"))
    randomize(delta, std=0.5)
    tuned = logits_of(dm, x)
    paths = [p for p in delta.paths() if p in quantized_modules(model)]
    before = {p: copy.deepcopy(model.get_submodule(p).weight) for p in paths}
    dm.merge()
    merged = logits_of(dm, x)
    for p in paths:
        w, old = model.get_submodule(p).weight, before[p]
        assert isinstance(w, intq.GroupQuantTensor) and w.bits == 4
        assert torch.equal(w.codes, old.codes) and torch.equal(w.scale, old.scale)
        assert not torch.equal(w.zero, old.zero)
    qa_err = rel(merged, tuned)
    assert qa_err <= 1e-5
    dm.unmerge()
    for p in paths:
        assert torch.equal(model.get_submodule(p).weight.zero, before[p].zero)
    assert torch.equal(logits_of(dm, x), tuned)

    lora = dt.wrap(ref, dt.LoRAConfig(r=4, targets=list({p.rsplit(".", 1)[1] for p in paths})))
    randomize(lora.get_delta("default"), std=0.5)
    lora_tuned = logits_of(lora, x)
    report = dt.merge_quantized(lora, requantize=True)
    lora_err = rel(logits_of(lora, x), lora_tuned)
    print(f"{arch_} int4 g16: QA-LoRA merge relative logit error {qa_err:.2e}; LoRA merged + requantized "
          f"{lora_err:.2e} (weights: relative {report.rel_error:.3f}, max abs {report.max_abs_error:.3f})")
    assert report.requantized and report.rel_error > 0.01 and lora_err > 100 * max(qa_err, 1e-7)


def test_qalora_on_int_base_saves_and_loads(tmp_path):
    model = tiny_model("llama", task="cls")
    dt.quantize(model, "int4", group_size=16)
    dm = dt.wrap(model, QALoRAConfig(r=4))
    x = train(dm, model, 3)
    tuned = logits_of(dm, x)
    dm.save(tmp_path / "q")
    fresh = dt.quantize(tiny_model("llama", task="cls"), "int4", group_size=16)
    loaded = dt.load(fresh, tmp_path / "q")
    assert torch.equal(logits_of(loaded, x), tuned)
    with pytest.raises(dt.CheckpointError, match="shape"):  # a dense 32-wide base pools by 8: other A shapes
        dt.load(tiny_model("llama", task="cls"), tmp_path / "q")


def test_qalora_errors_name_the_field_and_nf4_merge_is_explicit():
    with pytest.raises(dt.ConfigError, match=r"QALoRAConfig\.group_size=5 does not divide"):
        dt.wrap(tiny_model("bert"), QALoRAConfig(group_size=5))
    with pytest.raises(dt.ConfigError, match=r"group_size=8 is no multiple .* use group_size=16"):
        dt.wrap(dt.quantize(tiny_model("llama"), "int4", group_size=16), QALoRAConfig(group_size=8))
    int_base = dt.quantize(tiny_model("llama"), "int4", group_size=16)
    dm = dt.wrap(int_base, QALoRAConfig(group_size=32))  # a multiple of 16 folds too
    randomize(dm.get_delta("default"), std=0.5)
    x = tiny_inputs(int_base)
    tuned = logits_of(dm, x)
    dm.merge()
    assert rel(logits_of(dm, x), tuned) <= 1e-5
    with pytest.raises(dt.ConfigError, match=r"QALoRAConfig\.dora="):
        QALoRAConfig(dora=True)
    with pytest.raises(dt.ConfigError, match=r"QALoRAConfig\.group_size="):
        QALoRAConfig(group_size=0)
    with pytest.raises(dt.ConfigError, match=r"QALoRAConfig\.init="):
        QALoRAConfig(init="olora")
    nf4 = dt.wrap(dt.quantize(tiny_model("llama"), "nf4"), QALoRAConfig())
    with pytest.raises(dt.MergeError, match="merge_quantized"):
        nf4.merge()
    nf4.add("b", QALoRAConfig())
    with pytest.raises(dt.MergeError, match="weighted"):
        nf4.add_weighted("c", ["default", "b"])


def int4_wrap(model, config):
    dt.quantize(model, "int4", group_size=32)
    return dt.wrap(model, config)


def test_qalora_learns_sst2_on_int4_minilm_and_merges_in_int4():
    before, after, dm = finetune(QALoRAConfig(r=8, targets=["query", "value"]), steps=40, lr=2e-2, n_dev=200,
                                 wrap=int4_wrap)
    x = {k: v for k, v in batches("dev", 64, 64, 0)[0].items() if k != "labels"}
    tuned = logits_of(dm, x)
    dm.merge()
    merged = logits_of(dm, x)
    err = rel(merged, tuned)
    w = dm.model.bert.encoder.layer[0].attention.self.query.weight
    print(f"QA-LoRA (int4, g32) SST-2 dev accuracy: untrained {before:.3f} -> {after:.3f}; merged into the "
          f"int4 zero points: relative logit change {err:.1e}; quantized weights "
          f"{dt.memory_report(dm).quantized_ratio:.3f}x fp32")
    assert isinstance(w, intq.GroupQuantTensor)
    assert before < 0.6 and after >= 0.65 and after >= before + 0.1
    assert err <= 1e-5 and torch.equal(merged.argmax(-1), tuned.argmax(-1))
