"""LoRA's initialisations from the pretrained weight (PiSSA, its randomized-SVD form, OLoRA, LoftQ),
LoRA+ learning-rate groups, and their peft interop.

Identity at init: PiSSA / OLoRA keep the base weight and subtract their initial factors, so the
outputs equal the base model's bit for bit (torch.equal, not a tolerance). LoftQ has no identity:
the model starts at Q + s B A ≈ W, its error measured against QLoRA's nf4(W).
"""
import pytest
import torch
import torch.nn as nn

import deltatune as dt
from deltatune.bench.methods import build, parse_method
from deltatune.bench.models import load_model
from deltatune.models import load_classifier, logits_of, tiny_inputs, tiny_model
from deltatune.quant import nf4
from deltatune.quant.api import quantized_modules
from realrun import finetune
from roundtrip import reload_bit_exact

PRINCIPAL = ["pissa", "pissa_niter_2", "olora"]
TARGETS = {"bert": ["query", "value", "intermediate.dense"], "gpt2": ["c_attn", "c_proj"],
           "llama": ["q_proj", "v_proj", "down_proj"]}


def perturb(dm, std=0.05, seed=0):
    """Move every trainable tensor (as training would), so that B A != B0 A0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dm.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def lora_layers(dm, name="default"):
    from deltatune.methods.lora import LoRALayer

    d = dm.get_delta(name)
    return {p: lay for p, lay in zip(d.paths(), d.layers.values()) if isinstance(lay, LoRALayer)}


# -- config ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes,field", [
    (dict(init="pissa_niter_"), "init"), (dict(init="pissa_niter_x"), "init"), (dict(init="svd"), "init"),
    (dict(loftq_iter=0, init="loftq"), "loftq_iter"), (dict(loftq_iter=2), "loftq_iter"),
    (dict(lr_ratio=0), "lr_ratio"), (dict(lr_ratio=-2.0), "lr_ratio"),
])
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(dt.ConfigError, match=rf"LoRAConfig\.{field}="):
        dt.LoRAConfig(**changes)


def test_config_parses_the_inits():
    assert dt.LoRAConfig(init="pissa_niter_16").svd_niter == 16
    assert dt.LoRAConfig(init="pissa_niter_16").init_kind == "pissa"
    assert dt.LoRAConfig(init="pissa").svd_niter is None
    cfg = dt.LoRAConfig(init="loftq", loftq_iter=3, lr_ratio=16)
    assert dt.config_from_dict(cfg.to_dict()) == cfg


# -- PiSSA / OLoRA -----------------------------------------------------------------------------------
@pytest.mark.parametrize("init", PRINCIPAL)
@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_identity_at_init_is_bit_exact(arch, init):
    model = tiny_model(arch)
    x = tiny_inputs(model)
    base = logits_of(model, x)
    dm = dt.wrap(model, dt.LoRAConfig(r=4, alpha=8, init=init, targets=TARGETS[arch], modules_to_save=[]))
    assert torch.equal(logits_of(dm, x), base)
    for path, layer in lora_layers(dm).items():
        assert layer.lora_A.abs().max() > 0 and layer.lora_B.abs().max() > 0, path  # not a zero init
        assert torch.equal(layer.update(), torch.zeros_like(layer.update())), path


def _weight(model, path):
    from deltatune.methods._weights import weight_out_in

    return weight_out_in(model.get_submodule(path)).detach().double()


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_pissa_factors_are_the_principal_part(arch):
    model = tiny_model(arch)
    dm = dt.wrap(model, dt.LoRAConfig(r=3, alpha=12, init="pissa", targets=TARGETS[arch]))
    for path, layer in lora_layers(dm).items():
        w = _weight(model, path)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        principal = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
        got = (layer.lora_B0 @ layer.lora_A0).double() * layer.scaling
        torch.testing.assert_close(got, principal, atol=1e-5, rtol=0)
        # A's rows and B's columns are orthogonal, their norms the singular values over s
        torch.testing.assert_close(layer.lora_A0.double().norm(dim=1) ** 2, s[:3] / layer.scaling, atol=1e-5, rtol=0)


def test_pissa_niter_is_the_randomized_svd_of_a_clear_spectrum():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(20, 20, generator=g))
    v, _ = torch.linalg.qr(torch.randn(24, 24, generator=g))
    spectrum = torch.tensor([9.0, 7.0, 5.0] + [0.01] * 17)
    lin = nn.Linear(24, 20)
    with torch.no_grad():
        lin.weight.copy_(u @ torch.diag(spectrum) @ v[:20])
    dm = dt.wrap(nn.Sequential(lin), dt.LoRAConfig(r=3, alpha=6, init="pissa_niter_2", targets=["0"]))
    layer = dm.get_delta("default").layers["0"]
    principal = u[:, :3] @ torch.diag(spectrum[:3]) @ v[:3]
    torch.testing.assert_close(layer.lora_B0 @ layer.lora_A0 * layer.scaling, principal, atol=1e-3, rtol=0)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_olora_factors_are_the_qr_split(arch):
    model = tiny_model(arch)
    dm = dt.wrap(model, dt.LoRAConfig(r=3, init="olora", targets=TARGETS[arch]))
    for path, layer in lora_layers(dm).items():
        q, upper = torch.linalg.qr(_weight(model, path))
        b0, a0 = layer.lora_B0.double(), layer.lora_A0.double()
        torch.testing.assert_close(b0.T @ b0, torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)  # orthonormal
        torch.testing.assert_close(b0 @ a0, q[:, :3] @ upper[:3], atol=1e-5, rtol=0)
        # peft's olora_init: no 1/s, so s B0 A0 is s times the QR part
        assert layer.scaling == 16 / 3


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_function_is_the_residual_base_plus_lora(init):
    """(W - s B0 A0) x + s B A x: PiSSA's / OLoRA's function with the residual in the base."""
    model = tiny_model("llama")
    x = tiny_inputs(model)
    dm = dt.wrap(model, dt.LoRAConfig(r=4, alpha=8, init=init, targets=TARGETS["llama"]))
    perturb(dm)
    got = logits_of(dm, x)
    ref = tiny_model("llama")
    with torch.no_grad():
        for path, layer in lora_layers(dm).items():
            module = ref.get_submodule(path)
            module.weight.sub_(layer.lora_B0 @ layer.lora_A0 * layer.scaling)  # the residual base
    plain = dt.wrap(ref, dt.LoRAConfig(r=4, alpha=8, targets=TARGETS["llama"]))
    with torch.no_grad():
        for path, layer in lora_layers(plain).items():
            layer.lora_A.copy_(lora_layers(dm)[path].lora_A)
            layer.lora_B.copy_(lora_layers(dm)[path].lora_B)
    torch.testing.assert_close(logits_of(plain, x), got, atol=1e-5, rtol=0)
    with dm.disabled():  # disabling gives the pretrained model, not the residual one
        assert torch.equal(logits_of(dm, x), logits_of(tiny_model("llama"), x))


@pytest.mark.parametrize("init", PRINCIPAL)
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_merge_unmerge_and_round_trip(tmp_path, arch, init):
    model = tiny_model(arch)
    x = tiny_inputs(model)
    dm = dt.wrap(model, dt.LoRAConfig(r=4, alpha=8, init=init, targets=TARGETS[arch]))
    perturb(dm)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tuned = logits_of(dm, x)
    dm.merge()
    torch.testing.assert_close(logits_of(dm, x), tuned, atol=1e-5, rtol=0)
    dm.unmerge()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert torch.equal(logits_of(dm, x), tuned)
    loaded = reload_bit_exact(dm, arch, tmp_path)  # B0, A0 come from the file (pissa_niter: not redrawn)
    layer = next(iter(lora_layers(loaded).values()))
    assert layer.lora_A0 is not None


def test_gradients_only_on_the_trainable_factors():
    model = tiny_model("bert")
    x = tiny_inputs(model)
    dm = dt.wrap(model, dt.LoRAConfig(r=4, init="pissa", targets=TARGETS["bert"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    initial = {p: (lay.lora_A0.clone(), lay.lora_B0.clone()) for p, lay in lora_layers(dm).items()}
    opt = torch.optim.AdamW(dm.optimizer_groups(1e-2))
    dm.train()
    for _ in range(2):
        dm(**x, labels=torch.tensor([0, 1])).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters())
    for path, layer in lora_layers(dm).items():
        assert not layer.lora_A0.requires_grad and torch.equal(layer.lora_A0, initial[path][0])
        assert torch.equal(layer.lora_B0, initial[path][1])
        assert not torch.equal(layer.lora_A, layer.lora_A0)  # A, B trained away from their init
    names = {n.rsplit(".", 1)[-1] for n, p in dm.named_parameters() if p.requires_grad}
    assert names == {"lora_A", "lora_B", "weight", "bias"}  # the factors and the classifier head


def test_dora_on_pissa_is_identity_and_merges():
    model = tiny_model("llama")
    x = tiny_inputs(model)
    base = logits_of(model, x)
    dm = dt.wrap(model, dt.LoRAConfig(r=4, alpha=8, init="pissa", dora=True, targets=TARGETS["llama"]))
    assert torch.equal(logits_of(dm, x), base)
    perturb(dm)
    tuned = logits_of(dm, x)
    dm.merge()
    torch.testing.assert_close(logits_of(dm, x), tuned, atol=1e-5, rtol=0)
    dm.unmerge()


def test_weighted_linear_combination_keeps_the_initial_factors():
    model = tiny_model("bert")
    x = tiny_inputs(model)
    dm = dt.wrap(model, dt.LoRAConfig(r=2, init="pissa", targets=["query", "value"], modules_to_save=[]), name="a")
    dm.add("b", dt.LoRAConfig(r=3, targets=["query"], modules_to_save=[]))
    perturb(dm)
    dm.activate("a", "b")
    both = logits_of(dm, x)
    new = dm.add_weighted("ab", ["a", "b"])
    assert new.config.r == 2 * 2 + 3  # A, A0 and b's A at the query modules
    dm.activate("ab")
    torch.testing.assert_close(logits_of(dm, x), both, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora", "loftq"])
def test_inits_from_the_weight_refuse_what_they_cannot_factorize(init):
    with pytest.raises(dt.ConfigError, match="embedding"):
        dt.wrap(tiny_model("gpt2"), dt.LoRAConfig(init=init, targets=["wpe"]))
    with pytest.raises(dt.ConfigError, match="r <= 32"):
        dt.wrap(tiny_model("bert"), dt.LoRAConfig(r=40, init=init, targets=["query"]))


# -- LoftQ --------------------------------------------------------------------------------------------
def _errors(model, dense, layers):
    """(||W - (Q + s B A)||_F, ||W - nf4(W)||_F) over the LoftQ modules (all of them together);
    `dense`: their pretrained weights as stored."""
    from deltatune.methods._weights import stored_layout

    loftq = qlora = 0.0
    for path, layer in layers.items():
        module = model.get_submodule(path)
        w = stored_layout(module, dense[path]).float()
        q = stored_layout(module, nf4.dequantize_nf4(module.weight)).float()
        q0 = stored_layout(module, nf4.dequantize_nf4(nf4.to_nf4(dense[path]))).float()
        loftq += (w - (q + layer.update().float())).norm().item() ** 2
        qlora += (w - q0).norm().item() ** 2
    return loftq ** 0.5, qlora ** 0.5


def _stored(model, paths):
    return {p: model.get_submodule(p).weight.detach().clone() for p in paths}


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_loftq_quantizes_its_targets_and_beats_qlora_init(tmp_path, arch):
    model = tiny_model(arch)
    dm = dt.wrap(model, dt.LoRAConfig(r=4, alpha=8, init="loftq", loftq_iter=3, targets=TARGETS[arch]))
    layers = lora_layers(dm)
    assert sorted(quantized_modules(model)) == sorted(layers)
    loftq, qlora = _errors(model, _stored(tiny_model(arch), layers), layers)
    print(f"{arch}: ||W - (Q + sBA)||_F = {loftq:.4f} (LoftQ, T=3) vs ||W - nf4(W)||_F = {qlora:.4f} (QLoRA)")
    assert loftq < 0.9 * qlora
    perturb(dm)
    loaded = reload_bit_exact(dm, arch, tmp_path)  # onto a fresh dense base: the saved codes, bit for bit
    for path in layers:
        a, b = model.get_submodule(path).weight, loaded.model.get_submodule(path).weight
        assert torch.equal(nf4.dequantize_nf4(a), nf4.dequantize_nf4(b))
    dm.remove("default")
    assert sorted(quantized_modules(model)) == sorted(layers)  # the LoftQ base stays quantized


def test_loftq_refusals_name_the_fix():
    model = tiny_model("bert")
    dt.quantize(model)
    with pytest.raises(dt.ConfigError, match="full-precision"):
        dt.wrap(model, dt.LoRAConfig(init="loftq", targets=["query"]))
    with pytest.raises(dt.ConfigError, match="tied"):
        dt.wrap(tiny_model("gpt2"), dt.LoRAConfig(init="loftq", targets=["lm_head"]))
    odd = nn.Sequential(nn.Linear(5, 6))
    with pytest.raises(dt.ConfigError, match="multiple of 64"):
        dt.wrap(odd, dt.LoRAConfig(r=2, init="loftq", targets=["0"]))


@pytest.mark.parametrize("how", ["dequantize", "merge_quantized"])
def test_loftq_delta_whose_base_is_gone_refuses_to_save(tmp_path, how):
    """A load onto the pretrained model needs Q's codes: once the targets were dequantized or merged
    into, the save is refused (before it, the file would miss them or hold the merged weights)."""
    dm = dt.wrap(tiny_model("bert"), dt.LoRAConfig(r=4, init="loftq", targets=["query"]))
    dm.save(str(tmp_path / "before"))  # saves while the LoftQ base is in place
    if how == "dequantize":
        dt.dequantize(dm.model)
    else:
        dt.merge_quantized(dm, requantize=True)  # the targets are NF4 again, but of the merged weights
    with pytest.raises(dt.CheckpointError, match="init='loftq'.*dequantized or merged into.*Save the delta before"):
        dm.save(str(tmp_path / "after"))
    assert not (tmp_path / "after").exists() or not any((tmp_path / "after").iterdir())


def test_loftq_with_dora_starts_at_q_plus_sba():
    x = tiny_inputs(tiny_model("llama"))
    plain = dt.wrap(tiny_model("llama"), dt.LoRAConfig(r=4, init="loftq", targets=["q_proj"]))
    dora = dt.wrap(tiny_model("llama"), dt.LoRAConfig(r=4, init="loftq", dora=True, targets=["q_proj"]))
    torch.testing.assert_close(logits_of(dora, x), logits_of(plain, x), atol=1e-5, rtol=0)


def test_loftq_error_on_minilm_is_below_qlora():
    """Real MiniLM weights: query / value of the first and last of its 6 layers, r=8, alpha=16 (s=2)."""
    import copy

    model, _ = load_classifier()
    paths = [n for n, _ in model.named_modules() if n.endswith(("attention.self.query", "attention.self.value"))]
    dense = _stored(model, paths)
    out = {}
    for iters in (1, 3):
        m = copy.deepcopy(model)
        dm = dt.wrap(m, dt.LoRAConfig(r=8, alpha=16, init="loftq", loftq_iter=iters, targets=["query", "value"],
                                      layers=[0, -1], modules_to_save=[]))
        out[iters] = _errors(m, dense, lora_layers(dm))
    print(f"MiniLM layers 0, 5 query+value: QLoRA ||W - nf4(W)||_F = {out[1][1]:.4f}; LoftQ "
          f"||W - (Q + sBA)||_F = {out[1][0]:.4f} (T=1), {out[3][0]:.4f} (T=3)")
    assert out[1][0] < out[1][1] and out[3][0] < out[1][0]


# -- LoRA+ --------------------------------------------------------------------------------------------
def test_lora_plus_groups_hold_every_trainable_tensor_once():
    dm = dt.wrap(tiny_model("bert"), dt.LoRAConfig(r=2, targets=["query", "value"], lr_ratio=16))
    groups = dm.optimizer_groups(1e-3, weight_decay=0.01, head_lr=0.5)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in dm.trainable_parameters()) and len(ids) == len(set(ids))
    names = {id(p): n for n, p in dm.named_parameters()}
    by_lr = {g["lr"]: {names[id(p)].rsplit(".", 1)[-1] for p in g["params"]} for g in groups}
    assert by_lr == {1e-3: {"lora_A"}, 1.6e-2: {"lora_B"}, 0.5: {"weight", "bias"}}
    assert all(g["weight_decay"] == 0.01 for g in groups)
    plain = dt.wrap(tiny_model("bert"), dt.LoRAConfig(r=2))
    assert [g["lr"] for g in plain.optimizer_groups(1e-3)] == [1e-3, 1e-3]  # lr_ratio=1: A and B together
    model = tiny_model("bert")
    dm2 = dt.wrap(model, dt.LoRAConfig(r=2, lr_ratio=4))
    model.bert.pooler.dense.weight.requires_grad_(True)  # a base tensor unfrozen by hand
    extra = dm2.optimizer_groups(1e-3)[-1]
    assert [id(p) for p in extra["params"]] == [id(model.bert.pooler.dense.weight)] and extra["lr"] == 1e-3


def test_bench_trains_b_at_the_ratio():
    model, _ = load_model("tiny-bert", 2, seed=0)
    b = build(parse_method("lora:r=2,lr_ratio=8,lr=0.01"), model, steps=10)
    names = {id(p): n for n, p in b.delta.named_parameters()}
    lrs = {names[id(p)].rsplit(".", 1)[-1]: g["lr"] for g in b.groups for p in g["params"]}
    assert lrs["lora_B"] == pytest.approx(0.08) and lrs["lora_A"] == 0.01
    opt = torch.optim.AdamW(b.groups)  # what bench/loop.py's TrainingRun builds from Built.groups
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([0.01, 0.01, 0.08])


def test_bench_run_steps_b_at_the_ratio(tmp_path, monkeypatch):
    """End to end: the suite's TrainingRun (what `deltatune bench` / `deltatune train` run) holds B at
    lr_ratio times A's rate after its schedule is set up, and its first step moves B by that rate."""
    from deltatune.bench import Budget, SuiteConfig, run_suite
    from deltatune.bench import suite as suite_module

    seen = {}

    class Spy(suite_module.TrainingRun):
        def __init__(self, model, groups, *args, **kwargs):
            super().__init__(model, groups, *args, **kwargs)
            names = {id(p): n for n, p in model.named_parameters()}
            seen["rates"] = {names[id(p)]: g["initial_lr"] for g in self.opt.param_groups for p in g["params"]}
            seen["start"] = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}
            seen["model"] = model

    monkeypatch.setattr(suite_module, "TrainingRun", Spy)
    cfg = SuiteConfig(model="tiny-bert", tasks=["SST-2"], methods=["lora:r=2,lr_ratio=8,lr=0.01"], out=str(tmp_path),
                      budget=Budget(steps=1, eval_every=1, batch_size=4, dev_size=8, warmup=0.0), quiet=True)
    assert run_suite(cfg)[0]["status"] == "ok"
    rates = {n.rsplit(".", 1)[-1]: r for n, r in seen["rates"].items() if ".lora_" in n}
    assert rates == {"lora_A": 0.01, "lora_B": pytest.approx(0.08)}
    # Adam's first step is lr * m / (sqrt(v) + eps) = lr * sign(g) where g != 0: B moves by its own lr
    # (8 x 0.01; 0.01 if the ratio were dropped); A's gradient is zero while B is (its first step: none)
    moved = {}
    for n, p in seen["model"].named_parameters():
        if n in seen["start"]:
            kind = n.rsplit(".", 1)[-1]
            moved[kind] = max(moved.get(kind, 0.0), (p.detach() - seen["start"][n]).abs().max().item())
    assert moved["lora_B"] == pytest.approx(0.08, rel=1e-4) and moved["lora_A"] == 0.0


def test_check_optimizer_refuses_an_optimizer_that_drops_the_ratio():
    dm = dt.wrap(tiny_model("bert"), dt.LoRAConfig(r=2, lr_ratio=16))
    dm.check_optimizer(torch.optim.AdamW(dm.optimizer_groups(1e-3)))  # the helper's groups pass
    sched_opt = torch.optim.AdamW(dm.optimizer_groups(1e-3, head_lr=0.3))
    torch.optim.lr_scheduler.LambdaLR(sched_opt, lambda s: 0.1)  # a schedule's common factor: still fine
    dm.check_optimizer(sched_opt)
    with pytest.raises(dt.ConfigError, match=r"lora_B at 16x .* at 1x: build the optimizer from dm.optimizer_groups"):
        dm.check_optimizer(torch.optim.AdamW(dm.trainable_parameters(), lr=1e-3))
    plain = dt.wrap(tiny_model("bert"), dt.LoRAConfig(r=2))
    plain.check_optimizer(torch.optim.AdamW(plain.trainable_parameters(), lr=1e-3))  # lr_ratio=1: nothing to check


def test_transformers_trainer_takes_the_groups_as_its_optimizer(tmp_path):
    """transformers.Trainer builds its own optimizer over every trainable tensor at one rate (the ratio
    dropped: check_optimizer says so); given optimizers=(AdamW(dm.optimizer_groups(lr)), None) it
    trains B at lr_ratio times A's rate, its schedule scaling both alike."""
    import transformers
    from datasets import Dataset

    model = tiny_model("bert")
    dm = dt.wrap(model, dt.LoRAConfig(r=2, lr_ratio=16))
    x = tiny_inputs(model, batch=8, seed=3)
    data = Dataset.from_dict({"input_ids": x["input_ids"].tolist(), "attention_mask": x["attention_mask"].tolist(),
                              "labels": [i % 2 for i in range(8)]})
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-3,
                                          report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
                                          max_steps=2, lr_scheduler_type="linear", warmup_steps=1)
    default = transformers.Trainer(model=dm, args=args, train_dataset=data)
    with pytest.raises(dt.ConfigError, match="at 16x .* at 1x"):
        dm.check_optimizer(default.create_optimizer())
    from deltatune.callback import DeltaCallback

    refused = transformers.Trainer(model=dm, args=args, train_dataset=data, callbacks=[DeltaCallback()])
    with pytest.raises(dt.ConfigError, match="at 16x .* at 1x"):  # never a silent 1x run
        refused.train()
    opt = torch.optim.AdamW(dm.optimizer_groups(args.learning_rate))
    trainer = transformers.Trainer(model=dm, args=args, train_dataset=data, optimizers=(opt, None))
    trainer.train()
    dm.check_optimizer(trainer.optimizer)
    rates = {id(p): g["initial_lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    names = {n.rsplit(".", 1)[-1]: id(p) for n, p in dm.named_parameters() if ".lora_" in n}
    assert rates[names["lora_A"]] == 1e-3 and rates[names["lora_B"]] == pytest.approx(1.6e-2)


# -- peft interop ---------------------------------------------------------------------------------------
PEFT_INITS = {  # (arch, peft init_lora_weights, targets, more LoraConfig fields)
    "bert-pissa": ("bert", "pissa", ["query", "value"], {}),
    "gpt2-pissa-conv1d": ("gpt2", "pissa", ["c_attn", "c_fc"], {}),
    "llama-olora": ("llama", "olora", ["q_proj", "v_proj", "down_proj"], {}),
    # DoRA's norm is taken of the residual base plus s B A in both; per-module r and alpha scale B0 A0
    "llama-pissa-dora-patterns": ("llama", "pissa", ["q_proj", "v_proj"],
                                  {"use_dora": True, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 16}}),
}


@pytest.mark.parametrize("case", list(PEFT_INITS))
def test_peft_pissa_olora_checkpoints_load_with_peft_logits(tmp_path, case):
    from interop.peft_helpers import peft_adapter, peft_logits

    arch, init, targets, more = PEFT_INITS[case]
    inputs, want = peft_adapter(tmp_path / "peft", arch, target_modules=targets, init_lora_weights=init,
                                lora_alpha=8, r=4, **more)
    dm = dt.load(tiny_model(arch), tmp_path / "peft")
    assert dm.get_delta("default").config.init == init
    torch.testing.assert_close(logits_of(dm, inputs), want, atol=1e-5, rtol=0)
    dm.save(str(tmp_path / "back"), format="peft")  # and back: peft re-derives B0, A0 itself
    torch.testing.assert_close(peft_logits(tmp_path / "back", arch, inputs), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init,form", [("pissa", "pissa"), ("pissa_niter_3", True), ("olora", "olora")])
def test_deltatune_inits_save_for_peft(tmp_path, init, form):
    """pissa / olora as themselves; the randomized SVD (which peft redraws at load) as the converted
    rank-2r plain LoRA that peft's path_initial_model_for_weight_conversion writes."""
    import json

    from interop.peft_helpers import peft_logits, train

    dm = dt.wrap(tiny_model("llama"), dt.LoRAConfig(r=4, alpha=8, init=init, targets=TARGETS["llama"]))
    inputs = tiny_inputs(dm.model)
    train(dm, inputs)
    want = logits_of(dm, inputs)
    dm.save(str(tmp_path / "p"), format="peft")
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == form and config["r"] == (4 if form is not True else 8)
    torch.testing.assert_close(peft_logits(tmp_path / "p", "llama", inputs), want, atol=1e-5, rtol=0)
    back = dt.load(tiny_model("llama"), tmp_path / "p")
    torch.testing.assert_close(logits_of(back, inputs), want, atol=1e-5, rtol=0)


def test_peft_converted_gpt2_olora_and_refusals(tmp_path):
    from interop.peft_helpers import peft_logits

    dm = dt.wrap(tiny_model("gpt2"), dt.LoRAConfig(r=2, alpha=4, rslora=True, init="olora", targets=["c_attn"]))
    perturb(dm)
    x = tiny_inputs(dm.model)
    dm.save(str(tmp_path / "p"), format="peft")  # peft's olora_init mishandles Conv1D: converted
    torch.testing.assert_close(peft_logits(tmp_path / "p", "gpt2", x), logits_of(dm, x), atol=1e-5, rtol=0)
    loftq = dt.wrap(tiny_model("bert"), dt.LoRAConfig(init="loftq", targets=["query"]))
    with pytest.raises(dt.ConfigError, match="loftq"):
        loftq.save(str(tmp_path / "q"), format="peft")


def test_peft_lora_plus_helper_matches_our_groups():
    """peft's create_loraplus_optimizer puts lora_B (and 1-D tensors) at lr * ratio: same B split."""
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    pm = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    opt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    peft_b = sum(p.numel() for g in opt.param_groups if g["lr"] == 1.6e-2 for p in g["params"])
    dm = dt.wrap(tiny_model("llama"), dt.LoRAConfig(r=2, targets=["q_proj"], lr_ratio=16))
    ours_b = sum(p.numel() for g in dm.optimizer_groups(1e-3) if g["lr"] == 1.6e-2 for p in g["params"])
    assert ours_b == peft_b > 0


# -- real model ---------------------------------------------------------------------------------------
def test_pissa_learns_sst2_on_real_model():
    # alpha = r (s = 1): PiSSA's factors start at S^(1/2), large next to LoRA's, so s = 2 overshoots in
    # 50 steps (0.65 measured at lr 1e-3 and 2e-3; s = 1: 0.725)
    before, after, dm = finetune(dt.LoRAConfig(r=8, alpha=8, init="pissa", targets=["query", "value"]),
                                 steps=50, lr=2e-3, n_dev=200)
    print(f"PiSSA SST-2 dev accuracy: untrained {before:.3f} -> {after:.3f}")
    assert before < 0.6
    assert after >= 0.68
