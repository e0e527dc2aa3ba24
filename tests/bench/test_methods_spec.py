from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from deltatune.bench.methods import FULL_LR, build, default_methods, parse_method
from deltatune.bench.models import load_model
from deltatune.core import registry
from deltatune.errors import ConfigError
from deltatune.methods.lora import LoRAConfig, LoRADelta


def test_parse_specs():
    s = parse_method("lora:r=16,alpha=32,lr=1e-3")
    assert s.label == "lora:r=16,alpha=32,lr=1e-3" and not s.full
    (c,) = s.components
    assert c.method == "lora" and c.options == {"r": 16, "alpha": 32} and c.learning_rate == 1e-3
    s = parse_method("lora:targets=[query,value],dropout=0.1+bitfit")
    assert [c.method for c in s.components] == ["lora", "bitfit"]
    assert s.components[0].options == {"targets": ["query", "value"], "dropout": 0.1}
    assert s.components[1].learning_rate == registry.get_method("bitfit").lr
    assert parse_method('lora:targets=["query","key"],rslora=true').components[0].options == {
        "targets": ["query", "key"], "rslora": True}
    assert parse_method("full").full and parse_method("full:lr=5e-5").components[0].learning_rate == 5e-5


@pytest.mark.parametrize("spec,match", [
    ("lorra", "Did you mean: lora"), ("lora:rank=4", "unknown key 'rank'"), ("lora:r=0", "r=0"),
    ("lora:r", "key=value"), ("full+lora", "cannot be combined"), ("full:r=4", "only lr"),
    ("lora:lr=-1", "positive"),
])
def test_bad_specs_name_the_problem(spec, match):
    with pytest.raises(ConfigError, match=match):
        parse_method(spec)


def test_default_methods_cover_the_registry():
    names = default_methods()
    standalone = {n for n in registry.available_methods() if not registry.get_method(n).delta_cls.combiner}
    assert names[0] == "full" and standalone <= set(names)
    assert "fusion" in registry.available_methods() and "fusion" not in names  # needs trained adapters
    assert "lora+bitfit" in names


def test_build_full_and_combination():
    model, _ = load_model("tiny-bert", 2, seed=0)
    n = sum(p.numel() for p in model.parameters())
    b = build(parse_method("full"), model, steps=10)
    assert b.delta is None and b.trainable == b.base_params == n
    assert b.groups[0]["lr"] == FULL_LR and len(b.groups[0]["params"]) == len(list(model.parameters()))

    model, _ = load_model("tiny-bert", 2, seed=0)
    b = build(parse_method("lora:r=2,lr=0.01+bitfit"), model, steps=10, head_lr=0.5)
    dm = b.delta
    assert dm.active == ("lora", "bitfit")
    assert b.configs[0]["modules_to_save"] is None and b.configs[1]["modules_to_save"] == []
    lrs = sorted(g["lr"] for g in b.groups)
    assert lrs == [registry.get_method("bitfit").lr, 0.01, 0.5]  # lora's own, its head, bitfit's biases
    grouped = {id(p) for g in b.groups for p in g["params"]}
    assert grouped == {id(p) for p in dm.trainable_parameters()}
    assert sum(len(g["params"]) for g in b.groups) == len(grouped)  # no tensor in two groups
    assert b.trainable == sum(p.numel() for p in dm.trainable_parameters())
    head = [g for g in b.groups if g["lr"] == 0.5][0]["params"]
    assert sum(p.numel() for p in head) == 32 * 2 + 2  # the classifier (hidden 32, 2 labels)
    b2 = build(parse_method("lora"), load_model("tiny-bert", 2, seed=0)[0], steps=10, lr=0.123)
    assert {g["lr"] for g in b2.groups} == {0.123}


@dataclass
class ScheduledConfig(LoRAConfig):
    method: ClassVar[str] = "scheduled_test"
    total_steps: int | None = None

    @classmethod
    def run_length_fields(cls, steps):
        return {"total_steps": steps}


class ScheduledDelta(LoRADelta):
    config_cls = ScheduledConfig
    seen: list = []

    def on_step(self, step):
        ScheduledDelta.seen.append(step)

    def regularization(self):
        return 0.0 * sum(p.sum() for p in self.parameters() if p.requires_grad)


@pytest.fixture
def scheduled():
    registry.register("scheduled_test", ScheduledConfig, ScheduledDelta, family="reparameterized")
    ScheduledDelta.seen = []
    yield
    registry._REGISTRY.pop("scheduled_test")


def test_schedule_field_filled_and_hooks_called(scheduled, one_thread, tmp_path):
    """A config's run-length field gets the run's length (and a registration without lr the
    registry's default rate); step(i) runs after every optimizer step."""
    model, _ = load_model("tiny-bert", 2, seed=0)
    b = build(parse_method("scheduled_test"), model, steps=7)
    assert b.configs[0]["total_steps"] == 7 and b.groups[0]["lr"] == 3e-3 == registry.get_method("scheduled_test").lr
    assert build(parse_method("scheduled_test:total_steps=3"), load_model("tiny-bert", 2)[0], 7).configs[0]["total_steps"] == 3

    from deltatune.bench import Budget, SuiteConfig, run_suite

    cfg = SuiteConfig(model="tiny-bert", tasks=["SST-2"], methods=["scheduled_test"], out=str(tmp_path),
                      budget=Budget(steps=5, eval_every=5, batch_size=4, dev_size=8), quiet=True, plots=False)
    (rec,) = run_suite(cfg)
    assert rec["status"] == "ok", rec.get("error")
    assert ScheduledDelta.seen == [0, 1, 2, 3, 4]
    assert torch.isfinite(torch.tensor(rec["loss"])).all()


def test_every_default_method_trains_in_the_suite(one_thread, tmp_path):
    """Each method of the default suite (every registered one, and the combinations) runs a cell:
    a method whose defaults need the run's length (AdaLoRA's total_step) gets it."""
    from deltatune.bench import Budget, SuiteConfig, run_suite

    methods = default_methods()
    assert "adalora" in methods and "sparse_adapter" in methods
    # hidden 32 // 32 leaves Compacter a bottleneck of 1, which n=4 cannot divide (MiniLM's is 12)
    methods = [m if m != "compacter" else "compacter:reduction_factor=4" for m in methods]
    cfg = SuiteConfig(model="tiny-bert", tasks=["SST-2"], methods=methods, out=str(tmp_path),
                      budget=Budget(steps=4, eval_every=4, batch_size=4, dev_size=8), quiet=True, plots=False)
    records = run_suite(cfg)
    failed = {r["method"]: r.get("error") for r in records if r["status"] != "ok"}
    assert not failed
    assert len(records) == len(methods)
    assert all(r["efficiency"]["trainable"] > 0 for r in records)


@pytest.mark.parametrize("method, fraction", [("lt_sft", 0.5), ("diff_pruning", 2 / 3)])
def test_sparse_switch_runs_inside_the_bench_loop(one_thread, tmp_path, method, fraction):
    """The bench puts the one-way switch (LT-SFT phase 2, diff pruning's projection) at its fraction
    of the run; the loop builds a new optimizer and the kept entries train after the switch."""
    from deltatune.bench import Budget, SuiteConfig
    from deltatune.bench.suite import Runner
    from deltatune.bench.tasks import get_task

    steps = 6
    cfg = SuiteConfig(model="tiny-bert", tasks=["SST-2"], methods=[method], out=str(tmp_path),
                      budget=Budget(steps=steps, eval_every=3, batch_size=4, dev_size=8), quiet=True, plots=False)
    record, built = Runner(cfg).train(get_task("SST-2"), parse_method(method), seed=0)
    delta = built.delta.get_delta(method)
    assert record["configs"][0]["switch_at"] == round(steps * fraction)
    assert delta.is_compact and delta.param_version == 1
    values = [v for _, lay in delta.compact_layers() for v in lay.sparse.val.values()]
    kept = sum(v.numel() for v in values)
    assert kept == max(1, round(delta.config.density * delta.target_numel()))
    if method == "lt_sft":  # phase 2 starts from zero differences: non-zero values were trained
        assert any(bool(v.detach().abs().sum() > 0) for v in values)
    heads = sum(p.numel() for p in built.delta.trainable_parameters()) - kept
    assert record["efficiency"]["trainable"] == kept + heads
