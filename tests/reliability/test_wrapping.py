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
