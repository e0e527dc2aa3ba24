"""Where adapter-like deltas sit: the attention and feed-forward sublayers of each block.

Shared by ``adapter``, ``compacter`` and ``fusion``. A site is the module whose output is a
sublayer's output before the residual add (roles ``attn_block`` / ``ffn_block`` of core/arch.py:
BERT's attention-output and FFN-output dense layers, GPT-2's ``attn`` / ``mlp``, Llama's
``self_attn`` / ``mlp``, T5's attention and ``DenseReluDense``), plus, for parallel adapters, the
module whose input is the sublayer's input (``*_block_in``; the site itself when absent). Other
models name these modules with ``sublayers=`` (or ``targets=`` for one adapter per named module).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..core import arch
from ..core.config import DeltaConfig
from ..core.targets import select
from ..errors import ConfigError, TargetError

SITE_KINDS = ("attn", "ffn")
PLACEMENTS = {"houlsby": ("attn", "ffn"), "pfeiffer": ("ffn",), "parallel": ("ffn",)}
SUBLAYER_KEYS = ("attn_block", "ffn_block", "attn_block_in", "ffn_block_in")


@dataclass
class SublayerConfig(DeltaConfig):
    """placement: "houlsby" (after the attention and the feed-forward sublayer), "pfeiffer" (after
        the feed-forward sublayer), "parallel" (from the sublayer input, added to its output).
    sites: which sublayers, overriding the placement's ("attn", "ffn"); parallel defaults to ffn.
    sublayers: for models outside the role table, regexes for the end of the module paths:
        {"attn_block": ..., "ffn_block": ..., "attn_block_in": ..., "ffn_block_in": ...}.
    hidden_size: the sublayer output width, when neither the module nor model.config tells it.
    """

    placement: str = "houlsby"
    sites: list[str] | None = None
    sublayers: dict[str, str] | None = None
    hidden_size: int | None = None

    def validate(self) -> None:
        super().validate()
        self.check_choice("placement", tuple(PLACEMENTS))
        if self.sites is not None and (not isinstance(self.sites, list) or not self.sites
                                       or any(s not in SITE_KINDS for s in self.sites)):
            self._fail("sites", self.sites, f"a non-empty list drawn from {SITE_KINDS}, or None")
        if self.sublayers is not None:
            if not isinstance(self.sublayers, dict) or not all(
                    k in SUBLAYER_KEYS and isinstance(v, str) for k, v in self.sublayers.items()):
                self._fail("sublayers", self.sublayers, f"a dict of regex strings keyed by {SUBLAYER_KEYS}")
        if self.hidden_size is not None:
            self.check_range("hidden_size", 1, integer=True)

    @property
    def parallel(self) -> bool:
        return self.placement == "parallel"

    def site_kinds(self) -> tuple[str, ...]:
        return tuple(self.sites) if self.sites is not None else PLACEMENTS[self.placement]


@dataclass(frozen=True)
class Site:
    kind: str          # "attn", "ffn", or "target" (named with targets=)
    path: str          # the module whose output changes
    input_path: str    # the module whose input is the sublayer input (== path for most models)
    dim: int           # width of the sublayer output
    dtype: torch.dtype


def role_table(model: nn.Module, cfg: SublayerConfig, method: str) -> dict[str, str]:
    if cfg.sublayers is not None:
        return dict(cfg.sublayers)
    mtype = arch.model_type(model)
    table = arch.ARCHITECTURES.get(mtype or "")
    if table is None or not all(f"{k}_block" in table for k in cfg.site_kinds()):
        raise TargetError(
            f"method {method!r} needs the attention and feed-forward sublayers, and architecture "
            f"{mtype or type(model).__name__!r} is not in the role table. Name them: "
            f"sublayers={{'attn_block': r'...', 'ffn_block': r'...'}}, regexes for the end of the module "
            f"paths whose output is the sublayer output before the residual add (e.g. "
            f"r'layers\\.\\d+\\.attn', r'layers\\.\\d+\\.mlp'); for placement='parallel' add "
            f"'attn_block_in' / 'ffn_block_in' when the sublayer input is another module's input. "
            f"Or pass targets=[...] for one adapter after each named module."
        )
    return table


def find_sites(model: nn.Module, cfg: SublayerConfig, method: str) -> list[Site]:
    """Every site of the model for this config, in model order."""
    found: list[tuple[str, str, str]] = []  # (kind, path, input path)
    if cfg.targets is not None:
        for path, _ in select(model, cfg.targets, layers=cfg.layers, exclude=cfg.exclude, method=method):
            found.append(("target", path, path))
    else:
        table = role_table(model, cfg, method)
        for kind in cfg.site_kinds():
            outs = _matches(model, table, f"{kind}_block", cfg, method)
            ins = _matches(model, table, f"{kind}_block_in", cfg, method) if cfg.parallel else None
            for path in outs:
                found.append((kind, path, pair(path, ins) if ins else path))
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    found.sort(key=lambda f: order[f[1]])
    return [Site(kind, path, inp, site_dim(model, path, cfg), site_dtype(model, path))
            for kind, path, inp in found]


def _matches(model: nn.Module, table: dict[str, str], role: str, cfg: SublayerConfig,
             method: str) -> list[str] | None:
    if role not in table:
        if role.endswith("_in"):
            return None
        raise TargetError(f"method {method!r}: sublayers has no {role!r} entry; add a regex for it.")
    pattern = rf"(.*\.)?({table[role]})"
    return [p for p, _ in select(model, pattern, layers=cfg.layers, exclude=cfg.exclude, method=method)]


def pair(path: str, inputs: list[str]) -> str:
    """The input module sharing the longest dotted prefix with the output module `path`."""
    def shared(other: str) -> int:
        n = 0
        for a, b in zip(path.split("."), other.split(".")):
            if a != b:
                break
            n += 1
        return n

    best = max(shared(i) for i in inputs)
    winners = [i for i in inputs if shared(i) == best]
    if len(winners) != 1:
        raise TargetError(f"cannot tell which of {winners[:3]} holds the input of sublayer {path!r}: "
                          f"make the sublayers '*_block_in' regex match one module per block.")
    return winners[0]


def site_dim(model: nn.Module, path: str, cfg: SublayerConfig) -> int:
    if cfg.hidden_size is not None:
        return cfg.hidden_size
    module = model.get_submodule(path)
    for attr in ("out_features", "nf", "embedding_dim"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    value = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(value, int):
        return value
    raise ConfigError(f"cannot tell the output width of {path!r} ({type(module).__name__}): "
                      f"pass hidden_size=<width of the sublayer output>.")


def site_dtype(model: nn.Module, path: str) -> torch.dtype:
    params = itertools.chain(model.get_submodule(path).parameters(), model.parameters())
    return next((p.dtype for p in params if p.is_floating_point()), torch.get_default_dtype())
