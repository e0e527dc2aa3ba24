"""SparseConfig: the options shared by the methods that change chosen base tensors sparsely."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..core.config import DeltaConfig


@dataclass
class SparseConfig(DeltaConfig):
    """params: names of the direct parameters of each target module to change (None: all of
    them, e.g. weight and bias). Targets default to every linear layer of the blocks.
    switch_at: ``dm.step(switch_at - 1)`` (after that many optimizer steps) runs the method's
    one-way switch (``finalize()`` / ``start_phase2()``) by itself and bumps ``param_version``;
    None: call it yourself. A harness sets it to ``switch_fraction`` of the run."""

    params: list[str] | None = None
    switch_at: int | None = None
    switch_fraction: ClassVar[float | None] = 0.5  # not a field: where a harness puts the switch

    @classmethod
    def run_length_fields(cls, steps: int) -> dict[str, Any]:
        return {} if cls.switch_fraction is None else {"switch_at": max(1, round(steps * cls.switch_fraction))}

    def validate(self) -> None:
        super().validate()
        if self.switch_at is not None:
            self.check_range("switch_at", 1, integer=True)
        if self.params is not None and (
            not isinstance(self.params, list) or not self.params
            or not all(isinstance(p, str) for p in self.params)
        ):
            self._fail("params", self.params, "a non-empty list of parameter names (e.g. ['weight']), or None")
