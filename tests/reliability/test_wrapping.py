"""Wrapping one base twice is refused while the first wrapper's deltas run on it (issue 18)."""
import pytest
import torch

import deltatune as dt
from deltatune.errors import ConfigError
from deltatune.models import logits_of, tiny_inputs, tiny_model


@pytest.mark.parametrize("arch", ["bert", "gpt2", "t5"])
def test_wrapping_a_wrapped_base_again_is_refused(arch):
    model = tiny_model(arch)
    x = tiny_inputs(model)
    base = logits_of(model, x)
    first = dt.wrap(model, dt.LoRAConfig(r=2))
    with torch.no_grad():
        for p in first.trainable_parameters():
            p.add_(0.3)
    with pytest.raises(ConfigError, match="already runs the deltas of another DeltaModel"):
        dt.wrap(model, dt.LoRAConfig(r=2))
    with pytest.raises(ConfigError, match="already runs the deltas"):
        dt.DeltaModel(model)
    first.unwrap()
    second = dt.wrap(model, dt.LoRAConfig(r=2))
    with second.disabled():
        assert torch.equal(logits_of(second, x), base)  # nothing of the first wrapper runs


def _disabled_first(model, how):
    """A first wrapper of `model` that holds deltas but has none running (no hook on the base)."""
    first = dt.wrap(model, dt.LoRAConfig(r=2))
    if how == "activate-none":
        first.activate()
    elif how == "removed":
        first.remove("default")
    elif how == "fusion-only":
        first.add("b", dt.LoRAConfig(r=2))
        first.activate()
    return first


@pytest.mark.parametrize("how", ["disabled-block", "activate-none", "removed", "fusion-only"])
@pytest.mark.parametrize("second", ["wrap", "DeltaModel", "load", "wrap-submodule"])
def test_a_first_wrapper_with_nothing_running_is_still_seen(how, second, tmp_path):
    model = tiny_model("bert")
    dt.wrap(tiny_model("bert"), dt.LoRAConfig(r=2)).save(tmp_path / "d")
    first = _disabled_first(model, how)
    calls = {"wrap": lambda: dt.wrap(model, dt.LoRAConfig(r=2)), "DeltaModel": lambda: dt.DeltaModel(model),
             "load": lambda: dt.load(model, tmp_path / "d"),
             "wrap-submodule": lambda: dt.wrap(model.bert, dt.LoRAConfig(r=2))}
    with first.disabled() if how == "disabled-block" else _nothing():
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # no hook to see
        with pytest.raises(ConfigError, match="already runs the deltas of another DeltaModel, active or disabled"):
            calls[second]()
    first.unwrap()
    calls[second]()  # once unwrapped, the base is free


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_a_wrapper_nobody_holds_and_a_copy_of_the_base_do_not_count():
    import copy
    import gc
    import pickle

    model = tiny_model("bert")
    first = _disabled_first(model, "activate-none")
    twin = copy.deepcopy(model)  # a copy of the base is another model
    dt.wrap(twin, dt.LoRAConfig(r=2))
    assert pickle.loads(pickle.dumps(model)) is not None  # the mark is not an attribute: still pickles
    del first
    gc.collect()
    dt.wrap(model, dt.LoRAConfig(r=2))  # the first wrapper is gone: nothing of it can run


def test_unwrap_merge_frees_the_base_too():
    model = tiny_model("bert")
    first = _disabled_first(model, "activate-none")
    base = first.unwrap(merge=True)
    dt.wrap(base, dt.LoRAConfig(r=2))
