"""NF4 quantization of the frozen base (QLoRA): accuracy of the format, memory, LoRA on top,
compute dtype, and merging into a 4-bit base."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import deltatune as dt
from deltatune.models import logits_of, tiny_inputs, tiny_model
from deltatune.quant import nf4
from deltatune.quant.api import quantized_modules

LEVELS = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
                       0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0])


def test_round_trip_error_within_level_spacing():
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    q = nf4.to_nf4(w)
    d = nf4.dequantize_nf4(q)
    assert torch.equal(d, q.get_original_weight())            # our fast path == torchao's
    assert q.quantized_data.dtype == torch.uint8 and q.quantized_data.numel() == w.numel() // 2
    assert q.quantized_scalers.dtype == torch.int8             # double quantization of the scales
    blocks, got = w.view(-1, 64), d.view(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    # the dequantized block scale (after double quantization) is what the codes multiply
    s2 = (q.quantized_scalers.view(-1, q.scaler_block_size) / q.quantization_factor[:, None]).flatten() + q.scaler_mean
    s2 = s2.unsqueeze(1)
    x = (blocks / absmax).clamp(-1, 1)
    hi = torch.bucketize(x, LEVELS).clamp(1, 15)
    spacing = LEVELS[hi] - LEVELS[hi - 1]
    bound = 0.5 * spacing * absmax + (s2 - absmax).abs() + 1e-6
    assert torch.all((got - blocks).abs() <= bound)
    assert ((s2 - absmax).abs() / absmax).max() < 0.02        # scales survive 8-bit quantization
    rel = ((got - blocks).norm() / blocks.norm()).item()
    print(f"NF4 round trip on N(0,1): relative error {rel:.4f}")
    assert 0.05 < rel < 0.12                                   # 4 bits: a real, bounded loss


def test_memory_of_quantized_base(arch):
    model = tiny_model(arch)
    dense = {n: m.weight.numel() * 4 for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D")}
    dt.quantize(model, "nf4")
    report = dt.memory_report(model)
    names = quantized_modules(model)
    assert names and report.quantized_fp32_bytes == sum(dense[n] for n in names)
    held = sum(nf4.nbytes(model.get_submodule(n).weight) for n in names)
    assert report.quantized_bytes == held
    assert report.quantized_ratio <= 0.3
    print(f"{arch}: quantized weights {report.quantized_ratio:.3f}x fp32, whole model {report.ratio:.3f}x")


def test_quantized_linear_matches_torchao_and_keeps_module_identity():
    model = tiny_model("llama")
    x = tiny_inputs(model)
    q_proj = model.model.layers[0].self_attn.q_proj
    keys = list(model.state_dict())
    dt.quantize(model)
    assert model.model.layers[0].self_attn.q_proj is q_proj and isinstance(q_proj, nn.Linear)
    assert list(model.state_dict()) == keys
    h = torch.randn(3, 32)
    assert torch.allclose(q_proj(h), F.linear(h, q_proj.weight), atol=1e-6)  # torchao's own F.linear
    assert type(model.lm_head) is nn.Linear                                     # output layer stays dense
    out = logits_of(model, x)
    copied = copy.deepcopy(model)
    assert torch.equal(logits_of(copied, x), out)
    dt.dequantize(model)
    assert type(q_proj) is nn.Linear and not dt.quant.is_quantized(q_proj.weight)
    assert torch.allclose(logits_of(model, x), out, atol=1e-6)


def test_lora_trains_on_nf4_base_and_base_stays_frozen(arch):
    model = tiny_model(arch, task="cls")
    x = tiny_inputs(model)
    x.pop("decoder_input_ids", None)
    dt.quantize(model, "nf4")
    packed = {n: model.get_submodule(n).weight.quantized_data.clone() for n in quantized_modules(model)}
    base = logits_of(model, x)
    dm = dt.wrap(model, dt.LoRAConfig(r=4))
    assert torch.allclose(logits_of(dm, x), base, atol=1e-6)
    dm.train()
    opt = torch.optim.AdamW(dm.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        dm(**x, labels=torch.tensor([0, 1])).loss.backward()
        grads = [p.grad for n, p in dm.get_delta("default").named_parameters() if "lora_B" in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
        opt.step()
        opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    for n, codes in packed.items():
        assert torch.equal(model.get_submodule(n).weight.quantized_data, codes)
    dm.eval()
    assert (logits_of(dm, x) - base).abs().max() > 1e-4


def test_compute_dtype_bfloat16():
    model = tiny_model("llama")
    x = tiny_inputs(model)
    ref = copy.deepcopy(model)
    dt.quantize(ref)
    dt.quantize(model, compute_dtype="bfloat16")
    assert model.model.layers[0].mlp.up_proj.compute_dtype == torch.bfloat16
    out = logits_of(model, x)
    assert out.dtype == torch.float32
    err = (out - logits_of(ref, x)).abs().max().item()
    assert 0 < err < 0.05                   # bf16 matmuls: close, not equal
    dm = dt.wrap(model, dt.LoRAConfig(r=2))
    dm(**x).logits.sum().backward()
    assert all(p.grad is not None for n, p in dm.named_parameters() if "lora_B" in n)
    with pytest.raises(dt.ConfigError, match="compute_dtype"):
        dt.quantize(tiny_model("llama"), compute_dtype="int8")


def test_dora_on_nf4_equals_dora_on_the_dequantized_base():
    model = tiny_model("llama")
    x = tiny_inputs(model)
    dt.quantize(model)
    dense = dt.dequantize(copy.deepcopy(model))
    a = dt.wrap(model, dt.LoRAConfig(r=2, dora=True))
    b = dt.wrap(dense, dt.LoRAConfig(r=2, dora=True))
    with torch.no_grad():
        for (_, p), (_, q) in zip(a.get_delta("default").named_parameters(), b.get_delta("default").named_parameters()):
            p.normal_(std=0.1)
            q.copy_(p)
    assert torch.allclose(logits_of(a, x), logits_of(b, x), atol=1e-5)


def test_merge_into_nf4_base_is_an_explicit_choice():
    model = tiny_model("llama")
    x = tiny_inputs(model)
    dt.quantize(model)
    dm = dt.wrap(model, dt.LoRAConfig(r=4))
    with torch.no_grad():
        for n, p in dm.get_delta("default").named_parameters():
            p.normal_(std=0.2)
    tuned = logits_of(dm, x)
    with pytest.raises(dt.MergeError, match="merge_quantized"):
        dm.merge()
    assert dm.merged == () and torch.equal(logits_of(dm, x), tuned)

    exact = copy.deepcopy(dm)                 # dequantize -> merge, kept dense: exact
    report = dt.merge_quantized(exact, requantize=False)
    assert not report.requantized and report.modules == ["model.layers.0.self_attn.q_proj",
                                                          "model.layers.0.self_attn.v_proj",
                                                          "model.layers.1.self_attn.q_proj",
                                                          "model.layers.1.self_attn.v_proj"]
    assert torch.allclose(logits_of(exact, x), tuned, atol=1e-5)
    exact.unmerge()
    assert torch.allclose(logits_of(exact, x), tuned, atol=1e-5)

    report = dt.merge_quantized(dm, requantize=True)   # -> requantize: 4-bit again, error reported
    assert report.requantized and set(quantized_modules(model)) >= set(report.modules)
    w = model.model.layers[0].self_attn.q_proj.weight
    assert dt.quant.is_quantized(w)
    assert 0 < report.max_abs_error < 0.5 and 0 < report.rel_error < 0.2
    assert report.per_module["model.layers.0.self_attn.q_proj"] <= report.max_abs_error
    print(report)
    assert (logits_of(dm, x) - tuned).abs().max() < 0.5
    with pytest.raises(dt.MergeError, match="quantized"):
        dm.unmerge()


def test_quantize_errors():
    with pytest.raises(dt.ConfigError, match="nf4"):
        dt.quantize(tiny_model("llama"), "nf5")
    with pytest.raises(dt.ConfigError, match="block_size"):
        dt.quantize(tiny_model("llama"), block_size=0)
    with pytest.raises(dt.ConfigError, match="no nn.Linear"):
        dt.quantize(tiny_model("llama"), skip=r".*")
    dm = dt.wrap(tiny_model("bert"), dt.BitFitConfig())
    dm.merge()
    with pytest.raises(dt.MergeError, match="unmerge"):
        dt.quantize(dm)


def test_quantize_a_wrapped_model_keeps_the_delta_running():
    model = tiny_model("gpt2")
    x = tiny_inputs(model)
    dm = dt.wrap(model, dt.LoRAConfig(r=2))
    with torch.no_grad():
        for p in dm.get_delta("default").parameters():
            p.normal_(std=0.1)
    before = logits_of(dm, x)
    dt.quantize(dm)
    assert "transformer.h.0.attn.c_attn" in quantized_modules(dm)   # GPT-2's Conv1D too
    after = logits_of(dm, x)
    assert 0 < (after - before).abs().max() < 0.2
    with dm.disabled():
        assert not torch.allclose(logits_of(dm, x), after)


def test_embeddings_option_quantizes_tables_and_whole_base_under_0_3x(arch):
    model = tiny_model(arch)
    x = tiny_inputs(model)
    dt.quantize(model, embeddings=True)
    tables = [n for n, m in model.named_modules() if isinstance(m, nf4.NF4Embedding)]
    assert tables
    report = dt.memory_report(model)
    print(f"{arch} with embeddings: whole model {report.ratio:.3f}x fp32")
    assert report.ratio <= 0.3
    out = logits_of(model, x)
    emb = model.get_submodule(tables[0])
    ids = torch.tensor([[0, 3, 5], [7, 1, 2]]) % emb.num_embeddings
    assert torch.equal(emb(ids), F.embedding(ids, nf4.dequantize_nf4(emb.weight)))  # row gather == full table
    assert torch.equal(logits_of(dt.dequantize(model), x), out)


def test_lora_on_a_quantized_embedding():
    model = tiny_model("llama")
    x = tiny_inputs(model)
    dt.quantize(model, embeddings=True)
    dm = dt.wrap(model, dt.LoRAConfig(r=2, targets=["embed_tokens", "q_proj"]))
    base = logits_of(dm, x)
    dm(**x).logits.sum().backward()
    layer = dm.get_delta("default").layers["model/embed_tokens"]
    assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0
    with pytest.raises(dt.MergeError, match="quantized"):
        dm.merge()
    dt.merge_quantized(dm, requantize=False)
    assert torch.allclose(logits_of(dm, x), base, atol=1e-5)


def test_partial_tuning_of_a_quantized_weight_is_refused():
    model = tiny_model("bert")
    dt.quantize(model)
    with pytest.raises(dt.TargetError, match="quantized"):
        dt.wrap(model, dt.PartialConfig(last_k=1))
    dm = dt.wrap(model, dt.BitFitConfig())     # biases stay dense: fine
    dm.merge()
    assert dm.merged == ("default",)
