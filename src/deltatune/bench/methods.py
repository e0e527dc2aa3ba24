"""What a benchmark row trains: ``full`` fine-tuning, one registered method, or several stacked.

Spec syntax (CLI ``--methods``): ``NAME[:key=value,...][+NAME[:...]]``, e.g. ``lora:r=16,alpha=32``,
``lora+bitfit``. Keys are the method's config fields, plus ``lr`` (this component's learning rate).
Values parse as JSON where they can (``8``, ``0.1``, ``true``, ``["query","value"]``); ``[a,b]`` is
a list of strings; anything else is a string.

Learning rates: each method registers its own, tuned for short runs (``register(..., lr=...)``);
full fine-tuning uses ``FULL_LR``. Fields whose value follows from the run's length (AdaLoRA's
``total_step``, the sparse methods' ``switch_at``) come from the config's ``run_length_fields``
when left at None. The bench names no method's fields.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from ..core.model import DeltaModel
from ..core.registry import available_methods, config_from_dict, get_method
from ..errors import ConfigError

FULL = "full"
FULL_LR = 2e-4  # full fine-tuning; a method's own rate comes from its registration (register(lr=...))
# Combinations the default suite adds when all their parts are registered (papers' pairings).
DEFAULT_COMBOS: tuple[str, ...] = ("lora+bitfit", "prompt+adapter")


@dataclass(frozen=True)
class Component:
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    lr: float | None = None

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return FULL_LR if self.method == FULL else get_method(self.method).lr


@dataclass(frozen=True)
class MethodSpec:
    label: str
    components: tuple[Component, ...]

    @property
    def full(self) -> bool:
        return self.components[0].method == FULL


def split_top(text: str, sep: str) -> list[str]:
    """Split on `sep` outside brackets and quotes."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return parts


def parse_value(text: str) -> Any:
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    low = text.lower()
    if low in ("true", "false", "none", "null"):
        return {"true": True, "false": False}.get(low)
    if text.startswith("[") and text.endswith("]"):
        return [parse_value(v) for v in split_top(text[1:-1], ",") if v.strip()]
    return text


def parse_component(text: str) -> Component:
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    if name != FULL:
        get_method(name)  # a clear error for unknown names
    options: dict[str, Any] = {}
    for part in split_top(rest, ",") if rest.strip() else []:
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"method option {part!r} in {text!r} must look like key=value.")
        options[key.strip()] = parse_value(value)
    lr = options.pop("lr", None)
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf")):
        raise ConfigError(f"lr={lr!r} in {text!r} must be a positive number.")
    if name == FULL and options:
        raise ConfigError(f"`full` takes only lr=..., not {sorted(options)}.")
    if name != FULL:
        config_from_dict({"method": name, **options})  # validates option names and values now
    return Component(name, options, lr)


def parse_method(text: str) -> MethodSpec:
    parts = [parse_component(p) for p in split_top(text, "+")]
    if any(c.method == FULL for c in parts) and len(parts) > 1:
        raise ConfigError(f"{text!r}: `full` fine-tuning cannot be combined with other methods.")
    return MethodSpec(text.replace(" ", ""), tuple(parts))


def default_methods() -> list[str]:
    """Full fine-tuning, every registered method with its defaults, and the default combinations.
    Methods that only combine other deltas (``fusion``: needs trained adapters) are left out."""
    names = [n for n in available_methods() if not get_method(n).delta_cls.combiner]
    combos = [c for c in DEFAULT_COMBOS if all(p in names for p in c.split("+"))]
    return [FULL, *names, *combos]


# -- building the trainable model -----------------------------------------------------------------
@dataclass
class Built:
    """The module to train, its optimizer groups, and what the reports need."""

    model: nn.Module
    groups: list[dict[str, Any]]
    configs: list[dict[str, Any]]
    trainable: int
    base_params: int
    delta: DeltaModel | None = None
    tokenizer: Any = None
    regroup: Any = None  # () -> the optimizer groups again, after a delta replaced its tensors


def component_config(comp: Component, index: int, steps: int) -> dict[str, Any]:
    cfg: dict[str, Any] = {"method": comp.method, **comp.options}
    if index > 0 and "modules_to_save" not in cfg:
        cfg["modules_to_save"] = []  # the first delta trains the task head
    for name, value in get_method(comp.method).config_cls.run_length_fields(steps).items():
        if cfg.get(name) is None:
            cfg[name] = value
    return config_from_dict(cfg).to_dict()


def build(spec: MethodSpec, model: nn.Module, steps: int, lr: float | None = None,
          head_lr: float | None = None) -> Built:
    """Attach the spec's deltas to `model` (or unfreeze it for ``full``). ``lr`` overrides every
    component's learning rate; ``head_lr`` sets the task head's (default: the method's)."""
    base_params = sum(p.numel() for p in model.parameters())
    if spec.full:
        model.requires_grad_(True)
        rate = spec.components[0].learning_rate if lr is None else lr
        return Built(model, [{"params": list(model.parameters()), "lr": rate}],
                     [{"method": FULL, "lr": rate}], base_params, base_params)
    dm = DeltaModel(model)
    names, rates, configs = [], [], []
    for i, comp in enumerate(spec.components):
        name = comp.method if comp.method not in names else f"{comp.method}_{i}"
        cfg = component_config(comp, i, steps)
        dm.add(name, cfg)
        names.append(name)
        rates.append(comp.learning_rate if lr is None else lr)
        configs.append({**cfg, "lr": rates[-1]})
    dm.activate(*names)

    def regroup() -> list[dict[str, Any]]:
        return [g for n, rate in zip(names, rates) for g in _groups(dm.get_delta(n), model, rate, head_lr)]

    return Built(dm, regroup(), configs, count_trainable(dm), base_params, dm, regroup=regroup)


def count_trainable(dm: DeltaModel) -> int:
    """Trainable entries of the active deltas (fixed-mask zeros not counted)."""
    return sum(p.numel() for p in dm.trainable_parameters()) - sum(
        dm.get_delta(n).masked_count() for n in dm.active)


def _groups(delta, model: nn.Module, rate: float, head_lr: float | None) -> list[dict[str, Any]]:
    """The delta's own optimizer groups (Delta.optimizer_groups: its per-parameter learning-rate
    multipliers, and its task head at `head_lr`)."""
    return delta.optimizer_groups(model, rate, head_lr)
