"""CompactingDelta: the one-way switch of every layer of a delta to its compact form, recorded in
the saved extra state so that loading rebuilds the right storage before the tensors arrive."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..core.delta import Delta, key_to_path
from ..core.layer import DeltaLayer, ParamCopy
from ..errors import CheckpointError, ConfigError, MergeError


class CompactingDelta(Delta):
    """A delta whose layers (those with ``to_sparse``-like compact forms) switch once.

    Layers taking part define ``names``, ``shapes``, ``is_compact``, ``compact_sizes()``,
    ``allocate_compact(sizes)``, ``check_compact(where)`` and ``merged``. Task heads
    (ParamCopy) stay as they are; ``reset_heads`` puts them back to their initial values.
    """

    def __init__(self, name: str, config: Any, model: nn.Module):
        super().__init__(name, config, model)
        # The base tensors each head was copied from: the frozen base keeps the initial values, so
        # naming its tensors costs no memory (plain dict: not a submodule, never saved or moved).
        self.head_init: dict[str, dict[str, torch.Tensor]] = {
            key: dict(model.get_submodule(key_to_path(key)).named_parameters(recurse=False))
            for key, lay in self.layers.items() if isinstance(lay, ParamCopy)
        }

    def compact_layers(self) -> list[tuple[str, DeltaLayer]]:
        return [(key_to_path(k), lay) for k, lay in self.layers.items() if not isinstance(lay, ParamCopy)]

    @property
    def is_compact(self) -> bool:
        return all(lay.is_compact for _, lay in self.compact_layers())

    def target_numel(self) -> int:
        """Entries of all targeted tensors (the denominator of ``density``)."""
        return sum(int(torch.Size(s).numel()) for _, lay in self.compact_layers() for s in lay.shapes.values())

    def kept(self) -> int:
        """Entries stored in the compact form."""
        return sum(sum(lay.compact_sizes().values()) for _, lay in self.compact_layers())

    def budget(self, density: float | None, k: int | None) -> int:
        total = self.target_numel()
        if k is None:
            k = max(1, round(density * total))
        if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= total:
            raise ConfigError(f"k={k!r} entries to keep must be an int in (0, {total}] (the targets' size).")
        return k

    def switch(self) -> None:
        """The method's one-way switch to its compact form (``finalize`` / ``start_phase2``)."""
        raise NotImplementedError

    def on_step(self, step: int) -> None:
        at = getattr(self.config, "switch_at", None)
        if at is not None and step + 1 == at and not self.is_compact:
            self.switch()
            self.param_version += 1

    def check_switch(self, action: str) -> None:
        if self.is_compact:
            raise ConfigError(f"delta {self.name!r} is in its compact form already; {action} runs once.")
        heads_merged = any(getattr(lay, "_stash", None) for lay in self.layers.values()
                           if isinstance(lay, ParamCopy))
        if heads_merged or any(lay.merged for _, lay in self.compact_layers()):
            raise MergeError(f"delta {self.name!r} is merged: call unmerge() before {action}.")

    def reset_heads(self) -> None:
        """Task heads back to their initial values (the base module keeps them untouched)."""
        with torch.no_grad():
            for key, initial in self.head_init.items():
                for n, v in self.layers[key].values.items():
                    v.copy_(initial[n])

    # state ------------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        if not self.is_compact:
            return {"compact": False}
        sizes = {f"{p}|{n}": c for p, lay in self.compact_layers() for n, c in lay.compact_sizes().items()}
        return {"compact": True, "sizes": sizes}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if not state.get("compact"):
            return
        sizes = state.get("sizes")
        if not isinstance(sizes, dict):
            raise CheckpointError(f"delta {self.name!r}: compact extra state lacks 'sizes'; the file is corrupt.")
        for path, lay in self.compact_layers():
            want = {n: sizes.get(f"{path}|{n}") for n in lay.names}
            if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in want.values()):
                raise CheckpointError(f"delta {self.name!r}: no valid saved size for {path}; the file is corrupt.")
            lay.allocate_compact(want)

    def load_delta_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_delta_state_dict(tensors)
        for path, lay in self.compact_layers():
            if lay.is_compact:
                lay.check_compact(path)
