"""Casting the base after wrapping (issue 18, "Wrapping and merging"): ``model.half()``,
``model.to(torch.bfloat16)``, ``model.float()`` on the wrapped base, or the same on the wrapper: the
deltas follow the cast and the outputs equal those of a wrapper cast as a whole; a base cast only in
part is refused with a ConfigError naming the fix."""
import copy

import pytest
import torch

import deltatune as dt
from deltatune.errors import ConfigError
from deltatune.models import logits_of, tiny_inputs, tiny_model

METHODS = ["lora", "ia3", "vera", "loha", "lokr", "bitfit", "mask", "diff_pruning", "adapter", "prefix",
           "prompt", "lst", "unipelt", "compacter"]
CASTS = {"half()": lambda m: m.half(), "to(bfloat16)": lambda m: m.to(torch.bfloat16),
         "to(dtype=float16)": lambda m: m.to(dtype=torch.float16), "bfloat16()": lambda m: m.bfloat16()}


def wrapped(method, arch="bert", dtype=torch.float32):
    model = tiny_model(arch).to(dtype)
    dm = dt.wrap(model, {"method": method})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in dm.trainable_parameters():
            p.add_((torch.randn(p.shape, generator=g) * 0.1).to(p.dtype))
    return dm


@pytest.mark.parametrize("target", ["base", "wrapper"])
@pytest.mark.parametrize("cast", list(CASTS))
@pytest.mark.parametrize("method", METHODS)
def test_the_deltas_follow_a_cast_of_the_base(method, cast, target):
    dm = wrapped(method)
    x = tiny_inputs(dm.model)
    logits_of(dm, x)  # a forward before the cast: nothing cached stays in the old dtype
    reference = copy.deepcopy(dm)
    CASTS[cast](reference)  # the wrapper cast as a whole casts its deltas too
    CASTS[cast](dm.model if target == "base" else dm)
    out = logits_of(dm, x)
    assert out.dtype == reference.model.dtype != torch.float32
    assert torch.equal(out, logits_of(reference, x))
    kinds = {p.dtype for p in dm.trainable_parameters() if p.is_floating_point()}
    assert torch.float32 not in kinds or method == "mask"  # mask's scores may stay float32


@pytest.mark.parametrize("method", ["lora", "ia3", "bitfit", "prefix"])
def test_a_half_base_cast_back_to_float_takes_the_deltas_along(method):
    dm = wrapped(method, dtype=torch.float16)
    x = tiny_inputs(dm.model)
    reference = copy.deepcopy(dm).float()
    dm.model.float()
    assert torch.equal(logits_of(dm, x), logits_of(reference, x))
    assert {p.dtype for p in dm.trainable_parameters()} == {torch.float32}


@pytest.mark.parametrize("method", ["lora", "ia3", "adapter"])
def test_training_goes_on_after_the_cast(method):
    dm = wrapped(method)
    x = tiny_inputs(dm.model)
    dm.model.to(torch.bfloat16)
    dm(**x).logits.float().sum().backward()
    grads = [p.grad for p in dm.trainable_parameters()]
    assert all(g is not None and g.dtype == torch.bfloat16 for g in grads)


def test_casting_while_merged_then_unmerging_gives_the_cast_base():
    dm = wrapped("lora")
    x = tiny_inputs(dm.model)
    plain = copy.deepcopy(dm.model)
    dm.merge()
    dm.model.half()
    dm.unmerge()
    unwrapped = copy.deepcopy(dm).unwrap()
    assert all(torch.equal(a, b) for a, b in zip(unwrapped.state_dict().values(), plain.half().state_dict().values()))
    assert logits_of(dm, x).dtype == torch.float16


@pytest.mark.parametrize("method", ["bitfit"])  # layers on every biased module, run before it
@pytest.mark.parametrize("part", ["bert.encoder", "bert.encoder.layer.1", "classifier"])
def test_a_base_cast_only_in_part_is_refused_with_the_fix(part, method):
    """(A LoRA layer runs after its module, whose own forward fails first on mixed dtypes: that is
    the base model's error, which a cast of the base alone gives too.)"""
    dm = wrapped(method)
    x = tiny_inputs(dm.model)
    dm.model.get_submodule(part).half()  # the classifier: the delta's copy of the head sees it
    with pytest.raises(ConfigError, match=r"part of the base model was cast from torch\.float32 to "
                                          r"torch\.float16 after wrapping, but .* is torch\.float32: cast "
                                          r"the whole model \(dm\.to\(torch\.float16\)\)"):
        logits_of(dm, x)
