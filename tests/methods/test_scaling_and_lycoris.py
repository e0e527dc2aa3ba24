"""IA3, VeRA, LoHa, LoKr, AdaLoRA on the tiny models: identity at init, merge == unmerged,
training touches only the delta, save/load round trip; and exact parity with peft's formulas."""
import copy

import pytest
import torch

import deltatune as dt
from deltatune.models import logits_of, tiny_inputs, tiny_model

CONFIGS = {
    "ia3": dt.IA3Config(),
    "vera": dt.VeRAConfig(r=16),
    "loha": dt.LoHaConfig(r=4),
    "lokr": dt.LoKrConfig(r=2),
    "lokr_both": dt.LoKrConfig(r=1, decompose_both=True),
    "adalora": dt.AdaLoRAConfig(init_r=4, target_r=2, total_step=10),
}


def perturb(delta, std=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_identity_at_init_and_merge(arch, kind):
    model = tiny_model(arch)
    x = tiny_inputs(model)
    base = logits_of(model, x)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    dm = dt.wrap(model, CONFIGS[kind])
    assert torch.allclose(logits_of(dm, x), base, atol=1e-6, rtol=0)
    perturb(dm.get_delta("default"))
    tuned = logits_of(dm, x)
    assert (tuned - base).abs().max() > 1e-3
    dm.merge()
    assert torch.allclose(logits_of(dm, x), tuned, atol=1e-5, rtol=0)
    dm.unmerge()
    for k, v in model.state_dict().items():
        assert torch.allclose(v, weights[k], atol=1e-6, rtol=0), k
    with dm.disabled():  # float rounding of W + ΔW - ΔW, amplified by T5's large logits
        assert torch.allclose(logits_of(dm, x), base, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_gradients_only_on_delta_and_round_trip(kind, tmp_path):
    model = tiny_model("bert", task="cls")
    x = tiny_inputs(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dm = dt.wrap(model, CONFIGS[kind])
    dm.train()
    opt = torch.optim.SGD(dm.trainable_parameters(), lr=0.1)
    for _ in range(2):
        (dm(**x, labels=torch.tensor([0, 1])).loss + dm.regularization()).backward()
        assert all(p.grad is None for p in model.parameters())
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    dm.eval()
    tuned = logits_of(dm, x)
    dm.save(tmp_path / "d")
    dm2 = dt.load(tiny_model("bert", task="cls"), tmp_path / "d")
    assert torch.equal(logits_of(dm2, x), tuned)


def test_ia3_vectors_scale_outputs_and_ffn_input():
    model = tiny_model("llama")
    dm = dt.wrap(model, dt.IA3Config())
    layers = dm.get_delta("default").layers
    assert set(layers) == {f"model/layers/{i}/{m}" for i in (0, 1)
                           for m in ("self_attn/k_proj", "self_attn/v_proj", "mlp/down_proj")}
    assert layers["model/layers/0/self_attn/k_proj"].ia3_l.shape == (16, 1)   # output scaling
    assert layers["model/layers/0/mlp/down_proj"].ia3_l.shape == (1, 64)      # input scaling
    lin = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        layers["model/layers/0/mlp/down_proj"].ia3_l.uniform_(0.5, 1.5)
    h = torch.randn(3, 64)
    want = torch.nn.functional.linear(h * layers["model/layers/0/mlp/down_proj"].ia3_l, lin.weight)
    assert torch.allclose(lin(h), want, atol=1e-6)


def test_ia3_unmerge_exact_with_zero_entries():
    model = tiny_model("bert")
    x = tiny_inputs(model)
    dm = dt.wrap(model, dt.IA3Config())
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in dm.get_delta("default").parameters():
            if p.dim() == 2 and p.shape[0] == 1 or p.shape[-1] == 1:
                p[..., 0] = 0.0  # a feature switched off: division could not restore it
    tuned = logits_of(dm, x)
    dm.merge()
    assert torch.allclose(logits_of(dm, x), tuned, atol=1e-5)
    dm.unmerge()
    assert all(torch.allclose(v, w0[k], atol=1e-6, rtol=0) for k, v in model.state_dict().items())


def test_ia3_feedforward_must_be_a_target():
    with pytest.raises(dt.TargetError, match="feedforward"):
        dt.wrap(tiny_model("llama"), dt.IA3Config(targets=["k_proj"], feedforward=["down_proj"]))


def test_lokr_shapes_follow_factorization():
    model = tiny_model("llama", intermediate_size=96)
    dm = dt.wrap(model, dt.LoKrConfig(r=2, targets=["down_proj", "q_proj"]))
    down = dm.get_delta("default").layers["model/layers/0/mlp/down_proj"]  # in 96 = 8*12, out 32 = 4*8
    assert down.lokr_w1.shape == (4, 8)
    assert down.lokr_w2_a.shape == (8, 2) and down.lokr_w2_b.shape == (2, 12)
    assert down.update().shape == (32, 96)
    q = dm.get_delta("default").layers["model/layers/0/self_attn/q_proj"]
    with torch.no_grad():
        q.lokr_w1.normal_()
    want = torch.kron(q.lokr_w1, q.lokr_w2_a @ q.lokr_w2_b) * q.scaling
    assert torch.equal(q.update(), want)


def test_loha_update_is_hadamard_of_two_low_rank_products():
    dm = dt.wrap(tiny_model("bert"), dt.LoHaConfig(r=3, alpha=6))
    layer = dm.get_delta("default").layers["bert/encoder/layer/0/attention/self/query"]
    perturb(dm.get_delta("default"))
    want = (layer.hada_w1_a @ layer.hada_w1_b) * (layer.hada_w2_a @ layer.hada_w2_b) * 2.0
    assert torch.allclose(layer.update(), want)
    assert layer.hada_w1_a.shape == (32, 3) and layer.hada_w2_b.shape == (3, 32)


# -- parity with peft's implementation (peft is a test-only dependency) ----------------------------
PEFT_CASES = [
    ("bert", dt.IA3Config(), "IA3Config",
     dict(target_modules=["key", "value", "layer.0.output.dense", "layer.1.output.dense"],
          feedforward_modules=["layer.0.output.dense", "layer.1.output.dense"])),
    ("gpt2", dt.IA3Config(), "IA3Config", {}),
    ("bert", dt.VeRAConfig(r=16, projection_prng_key=3), "VeraConfig", dict(r=16, projection_prng_key=3)),
    ("gpt2", dt.VeRAConfig(r=8), "VeraConfig", dict(r=8)),
    ("bert", dt.LoHaConfig(r=4, alpha=6), "LoHaConfig", dict(r=4, alpha=6)),
    ("llama", dt.LoKrConfig(r=2, alpha=3), "LoKrConfig", dict(r=2, alpha=3)),
    ("llama", dt.LoKrConfig(r=1, decompose_both=True), "LoKrConfig", dict(r=1, alpha=8, decompose_both=True)),
    ("bert", dt.LoKrConfig(r=8, decompose_factor=4), "LoKrConfig", dict(r=8, alpha=8, decompose_factor=4)),
    ("bert", dt.AdaLoRAConfig(init_r=4, target_r=2, alpha=5, total_step=10), "AdaLoraConfig",
     dict(init_r=4, target_r=2, lora_alpha=5, total_step=10)),
    ("gpt2", dt.AdaLoRAConfig(init_r=3, target_r=1, total_step=10), "AdaLoraConfig",
     dict(init_r=3, target_r=1, lora_alpha=8, total_step=10, fan_in_fan_out=True)),
]


@pytest.mark.parametrize("arch_,ours,peft_name,kwargs", PEFT_CASES)
def test_same_outputs_as_peft(arch_, ours, peft_name, kwargs):
    """Copy our tensors into peft's model (same names and layout) and compare logits."""
    peft = pytest.importorskip("peft")
    model = tiny_model(arch_)
    x = tiny_inputs(model)
    task = "SEQ_CLS" if arch_ == "bert" else "CAUSAL_LM"
    pm = peft.get_peft_model(copy.deepcopy(model), getattr(peft, peft_name)(task_type=task, **kwargs))
    dm = dt.wrap(model, ours)
    delta = dm.get_delta("default")
    perturb(delta)
    theirs = dict(pm.named_parameters())
    copied = 0
    with torch.no_grad():
        for key, value in delta.delta_state_dict().items():
            path, _, name = key.rpartition(".")
            if path.endswith(".values"):  # the fresh head, peft's modules_to_save
                path = path[: -len(".values")]
                target = theirs[f"base_model.model.{path}.modules_to_save.default.{name}"]
            else:
                target = theirs[f"base_model.model.{path}.{name}.default"]
            target.copy_(value.reshape(target.shape))
            copied += 1
    assert copied == len(delta.delta_state_dict())
    if hasattr(delta, "projections"):  # VeRA: the shared matrices regenerate bit for bit
        buffers = {n.rsplit(".", 2)[-2]: v for n, v in pm.named_buffers() if n.endswith(".default")}
        assert torch.equal(delta.projections.vera_A, buffers["vera_A"])
        assert torch.equal(delta.projections.vera_B, buffers["vera_B"])
    pm.eval()
    ours_out = logits_of(dm, x)
    assert torch.allclose(ours_out, pm(**x).logits.detach(), atol=1e-6, rtol=0)
    with dm.disabled():
        assert (ours_out - logits_of(dm, x)).abs().max() > 1e-4
