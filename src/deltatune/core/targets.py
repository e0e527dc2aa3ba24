"""Target selection shared by every method: suffixes, regex, layer indices, module types."""
from __future__ import annotations

import difflib
import re
from collections.abc import Iterator

import torch.nn as nn

from ..errors import TargetError, close_matches

_LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """Index of the block a module lives in: the first numeric path component (``h.3.attn`` -> 3)."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def num_layers(model: nn.Module) -> int | None:
    """Blocks in the model: one more than the highest block index of any module name."""
    idx = [i for i in (layer_index(n) for n, _ in model.named_modules()) if i is not None]
    return max(idx) + 1 if idx else None


def name_matches(name: str, targets: list[str] | str) -> bool:
    """A list matches by suffix on dotted components, a string is a full regex match."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def resolve_layers(layers: list[int] | None, n_layers: int | None) -> set[int] | None:
    if layers is None:
        return None
    beyond = [i for i in layers if n_layers is not None and not -n_layers <= i < n_layers]
    if beyond:
        raise TargetError(f"layers {beyond} are beyond the model's {n_layers} blocks: use indices in "
                          f"0..{n_layers - 1} (or -{n_layers}..-1 from the end).")
    if any(i < 0 for i in layers):
        if n_layers is None:
            raise TargetError("negative layer indices need a model with numbered layers.")
        return {i + n_layers if i < 0 else i for i in layers}
    return set(layers)


def iter_named(model: nn.Module, what: str) -> Iterator[tuple[str, object]]:
    if what == "modules":
        yield from ((n, m) for n, m in model.named_modules() if n)
    else:
        yield from model.named_parameters()


def select(
    model: nn.Module,
    targets: list[str] | str,
    *,
    layers: list[int] | None = None,
    exclude: list[str] | str | None = None,
    what: str = "modules",
    method: str = "",
) -> list[tuple[str, object]]:
    """Every module (or parameter, ``what="params"``) whose name matches; an error if none does.

    Modules under another matched module are kept too: methods filter by type afterwards.
    """
    wanted = resolve_layers(layers, num_layers(model) if layers else None)
    names: list[str] = []
    found: list[tuple[str, object]] = []
    for name, obj in iter_named(model, what):
        names.append(name)
        if not name_matches(name, targets):
            continue
        if exclude and name_matches(name, exclude):
            continue
        if wanted is not None and layer_index(name) not in wanted:
            continue
        found.append((name, obj))
    if not found:
        raise TargetError(_no_match_message(targets, layers, names, what, method))
    return found


def _no_match_message(targets, layers, names: list[str], what: str, method: str) -> str:
    kind = "module" if what == "modules" else "parameter"
    items = [targets] if isinstance(targets, str) else targets
    hint = _suggestions([str(t) for t in items], names, kind)
    where = f" in layers {layers}" if layers is not None else ""
    return (
        f"targets {targets!r}{where} match no {kind} of the model"
        f"{f' (method {method!r})' if method else ''}.{hint} Targets are {kind}-name suffixes "
        f"(a list) or one full regex (a string); see model.named_{'modules' if what == 'modules' else 'parameters'}() for the names."
    )


def _suggestions(targets: list[str], names: list[str], kind: str) -> str:
    """Suffixes close to each target (what a target list holds), with one full name of each."""
    tails: dict[str, str] = {}
    for n in names:
        tails.setdefault(n.rsplit(".", 1)[-1], n)
    hints: list[str] = []
    for t in targets:
        for tail in difflib.get_close_matches(t.rsplit(".", 1)[-1], list(tails), n=3, cutoff=0.6):
            hints.append(f"{tail!r} (e.g. {tails[tail]})")
        if "." in t:
            hints += close_matches(t, names, n=2)
    hints = list(dict.fromkeys(hints))
    return f" Closest {kind} names: {', '.join(hints)}." if hints else ""
