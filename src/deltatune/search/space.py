"""The search space: which method, at which size, in which layer (AutoPEFT, Zhou et al. 2024).

A space is a list of candidate methods, each written like a bench method spec with one field given
several values separated by ``|`` (its size): ``lora:r=2|4|8``, ``adapter:reduction_factor=8|16``;
a candidate without ``|`` is on/off (``ia3``). For every layer of the model and every candidate the
search picks "absent" or one of the sizes. A configuration is turned into deltas by grouping the
layers that got the same (candidate, size): one delta per group, with ``layers=[...]``, so the
result is a plain bench method spec (``lora:r=8,layers=[0,3]+ia3:layers=[1]``) that ``deltatune
train`` and ``DeltaModel.add`` accept as it is.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..bench.methods import parse_value, split_top
from ..core.registry import config_from_dict, get_method
from ..errors import ConfigError

DEFAULT_SPACE: tuple[str, ...] = ("lora:r=2|4|8", "adapter:reduction_factor=8|16|32", "ia3")
OFF = 0  # choice index meaning "this candidate is absent from this layer"


@dataclass(frozen=True)
class Candidate:
    method: str
    size_field: str | None = None
    sizes: tuple[Any, ...] = (True,)  # (True,): on/off only
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.method if self.size_field is None else f"{self.method}.{self.size_field}"

    def options_for(self, size_index: int) -> dict[str, Any]:
        opts = dict(self.options)
        if self.size_field is not None:
            opts[self.size_field] = self.sizes[size_index - 1]
        return opts


def parse_candidate(text: str) -> Candidate:
    name, _, rest = text.strip().partition(":")
    get_method(name.strip())  # a clear error for unknown methods
    options, size_field, sizes = {}, None, (True,)
    for part in split_top(rest, ",") if rest.strip() else []:
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"search candidate option {part!r} in {text!r} must look like key=value.")
        if key == "layers":
            raise ConfigError(f"{text!r}: the search chooses `layers` itself; leave it out.")
        if "|" in value:
            if size_field is not None:
                raise ConfigError(f"{text!r}: only one field may list alternatives (a|b|c).")
            size_field, sizes = key, tuple(parse_value(v) for v in value.split("|"))
        else:
            options[key] = parse_value(value)
    cand = Candidate(name.strip(), size_field, sizes, options)
    for i in range(1, len(sizes) + 1):
        opts = {k: v for k, v in cand.options_for(i).items() if k != "lr"}  # lr: the component's
        config_from_dict({"method": cand.method, **opts})  # validate every size now
    return cand


def parse_space(texts: list[str] | tuple[str, ...] | None) -> list[Candidate]:
    cands = [parse_candidate(t) for t in (texts or DEFAULT_SPACE)]
    labels = [c.label for c in cands]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"search space lists a method twice: {labels}; give each one once.")
    return cands


def spec_of(choices: dict[tuple[int, int], int], cands: list[Candidate], n_layers: int) -> str:
    """The bench method spec of a configuration: ``choices[(candidate, layer)]`` = size index."""
    parts = []
    for ci, cand in enumerate(cands):
        for si in range(1, len(cand.sizes) + 1):
            layers = [lay for lay in range(n_layers) if choices.get((ci, lay), OFF) == si]
            if layers:
                parts.append(component_text(cand.method, {**cand.options_for(si), "layers": layers}))
    return "+".join(parts)


def component_text(method: str, options: dict[str, Any]) -> str:
    body = ",".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in options.items())
    return f"{method}:{body}" if body else method
