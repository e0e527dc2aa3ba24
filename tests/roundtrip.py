"""The save -> load round trip that every method's tests assert bit-exact."""
from __future__ import annotations

import torch

import deltatune as dt
from deltatune.models import logits_of, tiny_inputs, tiny_model


def reload_bit_exact(dm, arch: str, tmp_path, name: str = "default"):
    """Save `dm`, load it into a fresh tiny `arch` model; assert equal logits and tensors; return it."""
    x = tiny_inputs(dm.model)
    want = logits_of(dm, x)
    dm.save(tmp_path / "d")
    loaded = dt.load(tiny_model(arch), tmp_path / "d")
    assert torch.equal(logits_of(loaded, x), want)
    a, b = dm.get_delta(name).delta_state_dict(), loaded.get_delta(name).delta_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return loaded
