"""The call context: layers pass values to each other through it by name, and a forward pass
leaves it empty (nothing carries over into the next call)."""
import pytest
import torch

import deltatune as dt
from deltatune.core.context import CallContext
from deltatune.core.delta import Delta
from deltatune.errors import ConfigError
from deltatune.methods.adapter import InputTap
from deltatune.models import logits_of, tiny_inputs, tiny_model

USERS = {  # methods whose layers talk through the context
    "parallel_adapter": dt.AdapterConfig(placement="parallel", sites=["attn", "ffn"]),
    "prefix": dt.PrefixConfig(num_virtual_tokens=3),
    "mam": dt.MAMConfig(),
    "unipelt": dt.UniPELTConfig(),
    "prompt": dt.PromptConfig(num_virtual_tokens=3),
    "ptuning": dt.PTuningConfig(num_virtual_tokens=3),
}


@pytest.mark.parametrize("kind", list(USERS))
@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_forward_leaves_the_context_empty_and_is_repeatable(kind, arch):
    model = tiny_model(arch)
    x = tiny_inputs(model)
    dm = dt.wrap(model, USERS[kind])
    first = logits_of(dm, x)
    assert dm.context.keys() == []
    assert torch.equal(logits_of(dm, x), first)
    assert dm.context.keys() == []


def test_two_deltas_of_one_method_keep_their_values_apart():
    model = tiny_model("bert")
    x = tiny_inputs(model)
    cfg = dt.AdapterConfig(placement="parallel", sites=["attn", "ffn"], modules_to_save=[])
    dm = dt.wrap(model, cfg, name="a")
    dm.add("b", cfg)
    for name in ("a", "b"):
        with torch.no_grad():
            for p in dm.get_delta(name).parameters():
                p.add_(torch.randn_like(p) * 0.1)
    dm.activate("a")
    ya = logits_of(dm, x)
    dm.activate("b")
    yb = logits_of(dm, x)
    dm.activate("a", "b")
    yab = logits_of(dm, x)
    assert dm.context.keys() == []
    taps = {lay.key for d in ("a", "b") for lay in dm.get_delta(d).layers.values() if isinstance(lay, InputTap)}
    assert taps and all(k.split(":")[0] in ("a", "b") for k in taps) and len(taps) % 2 == 0
    assert not torch.allclose(ya, yb) and not torch.allclose(yab, ya) and not torch.allclose(yab, yb)


def test_a_layer_outside_a_model_says_so():
    with pytest.raises(ConfigError, match="no call context"):
        InputTap("k").post(torch.nn.Identity(), torch.zeros(1), torch.zeros(1))


def test_branch_is_restored_after_nesting_and_errors():
    ctx, node = CallContext(), object()
    with ctx.branch(node, 0):
        with ctx.branch(node, 1):
            assert ctx.chosen_branch(node) == 1
        assert ctx.chosen_branch(node) == 0
        with pytest.raises(RuntimeError), ctx.branch(node, 2):
            raise RuntimeError
        assert ctx.chosen_branch(node) == 0
    assert ctx.chosen_branch(node) is None


def test_layers_hold_no_hidden_references_to_other_layers():
    """Every attribute of a layer that is a module is a registered submodule (saved, moved, seen)."""
    model = tiny_model("gpt2")
    dm = dt.wrap(model, dt.UniPELTConfig(), name="u")
    dm.add("m", dt.MAMConfig())
    dm.add("p", dt.PTuningConfig(num_virtual_tokens=2))
    for name in dm.deltas:
        delta: Delta = dm.get_delta(name)
        for layer in delta.layers.values():
            for attr, value in vars(layer).items():
                held = value if isinstance(value, (tuple, list)) else (value,)
                assert not any(isinstance(v, torch.nn.Module) for v in held), (name, type(layer), attr)
