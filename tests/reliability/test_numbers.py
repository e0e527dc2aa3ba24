"""Numbers that must never be accepted silently (issue 18): non-finite config values, learning
rates <= 0, layer indices past the model, mixed-delta name lists that do not fit the batch."""
import math

import pytest
import torch

import deltatune as dt
from deltatune.bench.methods import build, parse_method
from deltatune.cli import main
from deltatune.errors import ConfigError, TargetError
from deltatune.models import tiny_inputs, tiny_model

BAD = [float("inf"), float("-inf"), float("nan")]


def float_fields():
    """Every float-valued field of every registered method's default config."""
    import dataclasses

    from deltatune.core.registry import method_specs

    out = []
    for spec in method_specs():
        try:
            cfg = spec.config_cls()
        except ConfigError:
            continue  # a method whose config has required fields: covered by the lists below
        out += [(spec.name, f.name) for f in dataclasses.fields(cfg)
                if isinstance(getattr(cfg, f.name), float)]
    return out


FLOAT_FIELDS = float_fields()


def test_the_field_table_is_not_empty():
    assert len(FLOAT_FIELDS) > 20 and ("lora", "alpha") in FLOAT_FIELDS


@pytest.mark.parametrize("value", BAD, ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("method, field", FLOAT_FIELDS, ids=[f"{m}.{f}" for m, f in FLOAT_FIELDS])
def test_non_finite_config_values_are_refused(method, field, value):
    with pytest.raises(ConfigError, match=rf"\.{field}=.* is invalid"):
        dt.config_from_dict({"method": method, field: value})


def test_non_finite_values_inside_lists_and_dicts():
    with pytest.raises(ConfigError, match="finite"):
        dt.LoRAConfig(alpha_pattern={"query": math.inf})


@pytest.mark.parametrize("spec", ["lora:lr=0", "lora:lr=-1", "lora:lr=inf", "full:lr=nan"])
def test_spec_learning_rates_must_be_positive_and_finite(spec):
    with pytest.raises(ConfigError, match="must be a positive number"):
        parse_method(spec)


@pytest.mark.parametrize("lr", ["0", "-1", "inf", "nan", "abc"])
def test_cli_learning_rates_must_be_positive_and_finite(lr, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--task", "sst2", "--method", "lora", "--lr", lr, "--out", "/nonexistent"])
    assert e.value.code == 2 and "--lr" in capsys.readouterr().err


def test_a_given_learning_rate_is_used_as_given():
    built = build(parse_method("lora"), tiny_model("bert"), steps=10, lr=1e-7)
    assert {g["lr"] for g in built.groups} == {1e-7}


@pytest.mark.parametrize("layers", [[2], [5], [-3], [0, 7]])
def test_layer_indices_beyond_the_model_are_refused(layers):
    with pytest.raises(TargetError, match=r"beyond the model's 2 blocks"):
        dt.wrap(tiny_model("bert"), dt.LoRAConfig(layers=layers))


def test_last_layer_from_the_end_still_works():
    dm = dt.wrap(tiny_model("bert"), dt.LoRAConfig(layers=[-1], modules_to_save=[]))
    assert dm.get_delta("default").paths() and all(".layer.1." in p for p in dm.get_delta("default").paths())


@pytest.mark.parametrize("names", [[], ["default"], ["default", None, "default"], "default"])
def test_mixed_delta_names_must_fit_the_batch(names):
    model = tiny_model("bert")
    dm = dt.wrap(model, dt.LoRAConfig(r=2))
    x = tiny_inputs(model, batch=2)
    with pytest.raises(ConfigError, match="one delta name .* per example"):
        dm(**x, deltas=names)
    out = dm(**x, deltas=["default", None]).logits
    assert out.shape[0] == 2 and torch.isfinite(out).all()


@pytest.mark.parametrize("bad", ["nan", "inf", "", "high", "-inf"])
def test_regression_labels_must_be_finite_numbers_and_name_the_row(tmp_path, bad):
    from deltatune.bench.tasks import parse_task

    (tmp_path / "t.csv").write_text(f"a,score\nx,0.5\ny,{bad}\nz,2\n", encoding="utf-8")
    task = parse_task(f"sim:train={tmp_path}/t.csv,dev={tmp_path}/t.csv,text=a,label=score,regression=true")
    with pytest.raises(ConfigError, match=r"row 1: regression label .* is not a finite number"):
        task.read("dev")


def test_a_module_both_targeted_and_saved_whole_is_refused():
    with pytest.raises(TargetError, match=r"classifier is both a target of 'lora' and inside modules_to_save"):
        dt.wrap(tiny_model("bert"), dt.LoRAConfig(targets=["query", "classifier"], modules_to_save=["classifier"]))
    # with the default modules_to_save the fresh head is saved whole and left out of the targets
    dm = dt.wrap(tiny_model("bert"), dt.LoRAConfig(targets=["query", "classifier"]))
    assert "classifier" in dm.get_delta("default").paths()
