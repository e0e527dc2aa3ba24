"""AdaLoRA: the cubic budget schedule, importance-based pruning to the budget, orthogonality loss,
and a saved delta that holds only the kept triplets."""
import json

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.models import logits_of, tiny_inputs, tiny_model


def train(dm, model, steps, zero_grad_first=False):
    x = tiny_inputs(model, batch=4, seed=3)
    labels = torch.tensor([0, 1, 1, 0])
    opt = torch.optim.AdamW(dm.trainable_parameters(), lr=1e-2)
    dm.train()
    for i in range(steps):
        loss = dm(**x, labels=labels).loss + dm.regularization()
        loss.backward()
        opt.step()
        if zero_grad_first:  # the order realrun uses: schedules must not depend on .grad
            opt.zero_grad(set_to_none=True)
            dm.step(i)
        else:
            dm.step(i)
            opt.zero_grad(set_to_none=True)
    dm.eval()
    return x


def test_schedule_is_cubic_between_warmup_and_final():
    dm = dt.wrap(tiny_model("bert"), dt.AdaLoRAConfig(init_r=6, target_r=2, total_step=20, tinit=3,
                                                     tfinal=4, deltaT=2))
    delta = dm.get_delta("default")
    init, target = 6 * 4, 2 * 4   # query and value of 2 layers
    assert (delta.init_budget, delta.target_budget) == (init, target)
    last = 20 - 4 - 1
    assert delta.budget(0) == (init, False) and delta.budget(3) == (init, False)
    for step in range(4, last):
        frac = 1 - (step - 3) / (last - 3)
        assert delta.budget(step) == (int((init - target) * frac ** 3 + target), step % 2 == 0)
    assert [b for b, _ in (delta.budget(s) for s in range(4, last))] == sorted(
        (b for b, _ in (delta.budget(s) for s in range(4, last))), reverse=True)
    assert delta.budget(last) == (target, True) and delta.budget(19) == (target, True)


@pytest.mark.parametrize("arch_,zero_grad_first", [("bert", False), ("llama", True), ("gpt2", False)])
def test_budget_reached_and_pruned_triplets_gone_from_saved_delta(arch_, zero_grad_first, tmp_path):
    model = tiny_model(arch_, task="cls")
    cfg = dt.AdaLoRAConfig(init_r=6, target_r=2, total_step=12, tinit=2, tfinal=3)
    dm = dt.wrap(model, cfg)
    delta = dm.get_delta("default")
    n = len(delta.svd_layers())
    x = train(dm, model, 12, zero_grad_first)
    ranks = delta.ranks()
    assert sum(ranks.values()) == cfg.target_r * n          # the budget, exactly
    for layer in delta.svd_layers().values():             # masked singular values are zero
        assert torch.all(layer.values()[~layer.mask] == 0)
    tuned = logits_of(dm, x)

    dm.save(tmp_path / "ada")
    meta = json.loads((tmp_path / "ada" / "delta_config.json").read_text())
    tensors = load_file(tmp_path / "ada" / meta["weights"])
    assert meta["extra_state"]["ranks"] == ranks
    kept = 0
    for path, r in ranks.items():
        assert tensors[f"{path}.lora_E"].shape == (r, 1)
        assert tensors[f"{path}.lora_A"].shape[0] == r and tensors[f"{path}.lora_B"].shape[1] == r
        kept += r
        assert torch.all(tensors[f"{path}.lora_E"] != 0)  # no pruned triplet survives in the file
    assert kept == cfg.target_r * n

    fresh = tiny_model(arch_, task="cls")
    dm2 = dt.load(fresh, tmp_path / "ada")
    assert dm2.get_delta("default").ranks() == ranks
    assert torch.allclose(logits_of(dm2, x), tuned, atol=1e-6, rtol=0)
    dm2.merge()
    assert torch.allclose(logits_of(dm2, x), tuned, atol=1e-5, rtol=0)


def test_importance_keeps_the_triplets_that_matter():
    """Triplets of one module get no gradient signal: the budget goes to the module that has it."""
    model = tiny_model("bert", task="cls")
    dm = dt.wrap(model, dt.AdaLoRAConfig(init_r=4, target_r=2, total_step=8, targets=["query", "value"],
                                        layers=[1], orth_reg_weight=0.0))
    delta = dm.get_delta("default")
    q = delta.layers["bert/encoder/layer/1/attention/self/query"]
    q.lora_A.register_hook(lambda g: torch.zeros_like(g))
    q.lora_B.register_hook(lambda g: torch.zeros_like(g))
    q.lora_E.register_hook(lambda g: torch.zeros_like(g))
    train(dm, model, 8)
    assert delta.ranks() == {"bert.encoder.layer.1.attention.self.query": 0,
                             "bert.encoder.layer.1.attention.self.value": 4}


def test_orthogonality_regularization_matches_definition():
    dm = dt.wrap(tiny_model("bert"), dt.AdaLoRAConfig(init_r=3, target_r=1, total_step=5, orth_reg_weight=0.3))
    delta = dm.get_delta("default")
    terms = []
    for layer in delta.svd_layers().values():
        a, b = layer.lora_A, layer.lora_B
        terms += [torch.linalg.norm(a @ a.T - torch.eye(3)), torch.linalg.norm(b.T @ b - torch.eye(3))]
    assert torch.allclose(dm.regularization(), 0.3 * torch.stack(terms).mean())
    dm.regularization().backward()
    assert all(layer.lora_A.grad is not None for layer in delta.svd_layers().values())
    assert dt.wrap(tiny_model("bert"), dt.AdaLoRAConfig(total_step=5, orth_reg_weight=0.0)).regularization() == 0.0


def test_config_errors_name_the_fix():
    with pytest.raises(dt.ConfigError, match="total_step"):
        dt.wrap(tiny_model("bert"), dt.AdaLoRAConfig())
    with pytest.raises(dt.ConfigError, match="tinit"):
        dt.AdaLoRAConfig(total_step=10, tinit=6, tfinal=4)
    with pytest.raises(dt.ConfigError, match="target_r"):
        dt.AdaLoRAConfig(init_r=4, target_r=6, total_step=10)


def test_step_without_backward_is_reported():
    dm = dt.wrap(tiny_model("bert"), dt.AdaLoRAConfig(init_r=2, target_r=1, total_step=3))
    with pytest.raises(dt.DeltaError, match="backward"):
        for i in range(3):
            dm.step(i)
