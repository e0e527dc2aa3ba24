"""LoRAHub (deltatune/lorahub.py): the combined delta is the weighted sum of the factors it
reports, the search follows nevergrad with the paper's objective, refusals name the fix."""
import pytest
import torch

import deltatune as dt
from deltatune.models import logits_of, tiny_inputs, tiny_model

from test_compose import perturb


def hub_model(arch="bert"):
    model = tiny_model(arch, task="cls").eval()  # no dropout: losses compare exactly
    dm = dt.wrap(model, dt.LoRAConfig(r=2), name="a")
    for n, seed in (("b", 2), ("c", 3)):
        dm.add(n, dt.LoRAConfig(r=2))
        perturb(dm.get_delta(n), std=0.3, seed=seed)
    perturb(dm.get_delta("a"), std=0.3, seed=1)
    return dm


def examples_of(dm, teacher, seed=5, rows=8):
    """A batch labelled by delta `teacher`'s predictions: composing towards it lowers the loss."""
    x = tiny_inputs(dm.model, batch=rows, seed=seed)
    dm.activate(teacher)
    with torch.no_grad():
        labels = logits_of(dm, x).argmax(-1)
    dm.activate("a")
    return {**x, "labels": labels}


def factors(delta):
    return {k: (lay.lora_A.detach().clone(), lay.lora_B.detach().clone()) for k, lay in delta.layers.items()
            if hasattr(lay, "lora_A")}


def test_combined_delta_is_the_weighted_sum_it_reports(tmp_path):
    dm = hub_model()
    batch = examples_of(dm, "b")
    res = dt.compose_lorahub(dm, "hub", ["a", "b", "c"], batch, budget=12, seed=0)
    assert res.delta == "hub" and len(res.weights) == 3 and len(res.history) == 12
    assert dm.active == ("a",) and dm.get_delta("hub").config.method == "lora"  # an ordinary lora, inactive
    assert not dm.model.training  # the mode it had
    hub, parts = factors(dm.get_delta("hub")), [factors(dm.get_delta(n)) for n in "abc"]
    for k, (a, b) in hub.items():
        assert torch.allclose(a, sum(w * p[k][0] for w, p in zip(res.weights, parts)), atol=1e-6)
        assert torch.allclose(b, sum(w * p[k][1] for w, p in zip(res.weights, parts)), atol=1e-6)
    # the reported objective is the mean loss at the reported weights plus 0.05 * mean |w|
    dm.activate("hub")
    with torch.no_grad():
        loss = float(dm(**batch).loss)
    assert res.loss == pytest.approx(loss + 0.05 * sum(abs(w) for w in res.weights) / 3, rel=1e-6)
    assert res.loss <= min(res.history) + 1e-9  # nevergrad's recommendation is the best it saw here
    # it saves and loads as any LoRA delta, bit-exact
    x = tiny_inputs(dm.model)
    y = logits_of(dm, x)
    dm.save(tmp_path / "hub", name="hub")
    assert torch.equal(logits_of(dt.load(tiny_model("bert", task="cls"), tmp_path / "hub"), x), y)


def test_search_improves_on_the_start_and_is_seeded():
    dm = hub_model()
    batch = examples_of(dm, "c")
    first = dt.compose_lorahub(dm, "h1", ["a", "b", "c"], [batch], budget=20, seed=1)
    again = dm.compose_lorahub("h2", ["a", "b", "c"], [batch], budget=20, seed=1)
    assert first.weights == again.weights and first.history == again.history
    with dm.disabled(), torch.no_grad():  # w = 0, the start: no update, the base's own head
        start = float(dm(**batch).loss)
    assert first.loss < start - 1e-3


def test_refusals_name_the_fix():
    dm = hub_model()
    batch = examples_of(dm, "b")
    with pytest.raises(dt.ConfigError, match="two or more distinct"):
        dt.compose_lorahub(dm, "h", ["a"], batch)
    with pytest.raises(dt.ConfigError, match="budget=0 is invalid"):
        dt.compose_lorahub(dm, "h", ["a", "b"], batch, budget=0)
    dm.add("r4", dt.LoRAConfig(r=4))
    with pytest.raises(dt.MergeError, match="rank 4.*must match"):
        dt.compose_lorahub(dm, "h", ["a", "r4"], batch)
    dm.add("ia3", dt.IA3Config())
    with pytest.raises(dt.MergeError, match="plain LoRA"):
        dt.compose_lorahub(dm, "h", ["a", "ia3"], batch)
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    with pytest.raises(dt.ConfigError, match="no loss"):
        dt.compose_lorahub(dm, "h", ["a", "b"], unlabelled, budget=2)
    assert "h" not in dm.deltas and dm.active == ("a",)  # a failed search leaves nothing behind
