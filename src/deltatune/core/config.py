"""Config base class shared by every method: validated at construction, JSON round trip."""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import ConfigError, did_you_mean


# Other libraries' names (peft, AdapterHub) for common fields: suggested when a config uses them.
KEY_ALIASES = {"rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets",
               "layers_to_transform": "layers", "exclude_modules": "exclude", "lora_r": "r"}


@dataclass
class DeltaConfig:
    """Fields common to all methods.

    targets: a list of module-name suffixes (``["query", "value"]``), or one full regex string
        (``r".*\\.layer\\.\\d+\\.attention\\.self\\.query"``); None takes the per-architecture default.
    layers: keep only modules in these layer indices (an int, or a list; negatives count from the
        end: ``[-1, -2]`` are the last two layers).
    exclude: suffixes or a regex of modules to drop after matching.
    modules_to_save: modules trained fully and saved whole with the delta. None = the task head the
        base model created fresh (``classifier``, ``score``, ...), [] = none.
    """

    method: ClassVar[str] = ""

    targets: list[str] | str | None = None
    layers: list[int] | int | None = None
    exclude: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.layers, int) and not isinstance(self.layers, bool):
            self.layers = [self.layers]
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        self.validate()

    # -- validation helpers -------------------------------------------------------------------
    def validate(self) -> None:
        """Subclasses extend this (call super) to check their own fields."""
        for f in dataclasses.fields(self):
            if not _finite(getattr(self, f.name)):
                self._fail(f.name, getattr(self, f.name), "finite numbers (no inf or nan)")
        for name in ("targets", "exclude"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    self._fail(name, value, "a list of module-name suffixes or one regex string")
                if name == "targets" and not value:
                    self._fail(name, value, "a non-empty list (or None for the architecture default)")
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as e:
                    self._fail(name, value, f"a valid regular expression ({e}); for module-name "
                                            f"suffixes pass a list, e.g. [{value!r}]")
        if self.layers is not None:
            if not isinstance(self.layers, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.layers
            ) or not self.layers:
                self._fail("layers", self.layers, "an int or a non-empty list of ints")
        if self.modules_to_save is not None and (
            not isinstance(self.modules_to_save, list)
            or not all(isinstance(v, str) for v in self.modules_to_save)
        ):
            self._fail("modules_to_save", self.modules_to_save, "a list of module names, or None")

    def _fail(self, name: str, value: Any, expected: str) -> None:
        raise ConfigError(f"{type(self).__name__}.{name}={value!r} is invalid: expected {expected}.")

    def check_range(self, name: str, low: float | None = None, high: float | None = None,
                    low_open: bool = False, high_open: bool = False, integer: bool = False) -> None:
        """Raise ConfigError unless `low <= self.name <= high` (open ends where asked)."""
        value = getattr(self, name)
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type:
            self._fail(name, value, "an integer" if integer else "a number")
        lo_ok = low is None or (value > low if low_open else value >= low)
        hi_ok = high is None or (value < high if high_open else value <= high)
        if not (lo_ok and hi_ok):
            self._fail(name, value, _range_text(low, high, low_open, high_open, integer))

    def check_choice(self, name: str, choices: tuple[Any, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            self._fail(name, value, f"one of {', '.join(map(repr, choices))}")

    @classmethod
    def run_length_fields(cls, steps: int) -> dict[str, Any]:
        """Fields whose value follows from the run's length (a schedule's total, a one-way switch),
        for a run of `steps` optimizer steps; a training harness fills those left at None."""
        return {}

    # -- serialization ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            out[f.name] = _plain(getattr(self, f.name))
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeltaConfig:
        data = dict(data)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise ConfigError(f"config says method={method!r} but {cls.__name__} is {cls.method!r}.")
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = [k for k in data if k not in names]
        if unknown:
            k = unknown[0]
            alias = KEY_ALIASES.get(k)
            hint = f" Did you mean: {alias}?" if alias in names else did_you_mean(k, names)
            raise ConfigError(
                f"unknown key {k!r} for method {cls.method!r}.{hint} "
                f"Valid keys: {', '.join(names)}."
            )
        return cls(**data)

    def replace(self, **changes: Any) -> DeltaConfig:
        return dataclasses.replace(self, **changes)


def _finite(value: Any) -> bool:
    """No inf / nan anywhere in a field's value (a number, or numbers inside lists and dicts)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def _range_text(low, high, low_open: bool, high_open: bool, integer: bool) -> str:
    """'an integer >= 1', 'a number > 0', 'a number in [0.0, 1.0)' ..."""
    kind = "an integer" if integer else "a number"
    if low is None and high is None:
        return kind
    if high is None:
        if integer and low_open:
            return f"{kind} >= {int(low) + 1}"
        return f"{kind} {'>' if low_open else '>='} {low}"
    if low is None:
        return f"{kind} {'<' if high_open else '<='} {high}"
    return f"{kind} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def _plain(value: Any) -> Any:
    """JSON-ready: tuples become lists (from_dict takes lists back)."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def field_list(default: list[Any] | None = None) -> Any:
    """A dataclass field with a list default (copied per instance)."""
    return field(default_factory=lambda: list(default or []))
