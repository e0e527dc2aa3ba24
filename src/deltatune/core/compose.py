"""Compositions of active deltas (AdapterHub's blocks): Stack, Parallel, Average, Fuse.

A composition is a small tree over delta names. Every Host whose module one of its deltas touches
evaluates the tree on that module's call, so the same code serves every method:

- ``Stack(a, b)``: a, then b (the default; plain ``activate(a, b)`` takes a fast path).
- ``Parallel(a, b)``: the model's batch is replicated once per member at the model input; member i
  sees only copy i everywhere, so the outputs come back concatenated along the batch
  (``[rows for a; rows for b]``), e.g. one task head per member.
- ``Average(a, b, weights=...)``: at every touched module the weighted mean of the members' outputs
  (weights normalized to sum 1; a member that does not touch the module contributes the unchanged
  output). For additive deltas this is ``y + sum_i w_i f_i(x)``.
- ``Fuse(a, b, fusion="f")``: the fusion delta (a ``Delta`` with ``combiner = True``) has at each
  module a ``CombiningLayer`` (core/layer.py) whose ``combine(module, args, kwargs, y, outs)``
  mixes the members' outputs (AdapterFusion implements it); the members stay frozen meanwhile.

Output transforms (``post``) combine directly. A member that swaps weights or changes inputs at a
module (heads, partial methods) re-runs that module's own forward for its branch; modules called
inside such a re-run see only that member. Compositions run on unmerged deltas only.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch.nn as nn

from ..errors import ConfigError

from .context import CallContext
from .layer import CombiningLayer, DeltaLayer
from .outputs import cat_rows, first_tensor, main_tensor, repeat_rows, replace_main, split_rows
from .swap import swapped

if TYPE_CHECKING:
    from .hooks import Host


# -- one module call, as a Host sees it ---------------------------------------------------------------
@dataclass
class Call:
    host: Host
    module: nn.Module
    args: tuple
    kwargs: dict

    @property
    def context(self) -> CallContext:
        """The model call's context: the branch a composition evaluates lives there, so module
        calls nested in a member's re-run follow that member."""
        return self.host.context

    def layer(self, name: str) -> DeltaLayer | None:
        return self.host.layers.get(name)

    def rows(self, start: int, stop: int, total: int) -> Call:
        return Call(self.host, self.module, split_rows(self.args, start, stop, total),
                    split_rows(self.kwargs, start, stop, total))


def rerun(call: Call, layers: list[DeltaLayer]) -> Any:
    """The module's own forward (its hooks skipped) with these layers' weights and inputs."""
    module, args, kwargs = call.module, call.args, call.kwargs
    with swapped(module, [lay for lay in layers if type(lay).uses().params]):
        for layer in layers:
            if type(layer).uses().pre:
                args, kwargs = layer.forward_pre(module, args, kwargs)
        return module.forward(*args, **kwargs)


# -- the tree ---------------------------------------------------------------------------------------
class Composition:
    kind: ClassVar[str] = ""
    min_members: ClassVar[int] = 1

    def __init__(self, *members: str | Composition):
        if len(members) == 1 and isinstance(members[0], (list, tuple)):
            members = tuple(members[0])
        if len(members) < self.min_members:
            raise ConfigError(f"{type(self).__name__}() needs at least {self.min_members} member(s).")
        for m in members:
            if not isinstance(m, (str, Composition)):
                raise ConfigError(f"{type(self).__name__} members are delta names or compositions, "
                                  f"got {m!r}.")
            if isinstance(m, Parallel):
                raise ConfigError("Parallel must be the outermost composition (it replicates the "
                                  "model's batch): use Parallel(Stack(...), ...), not X(Parallel(...)).")
        self.members: tuple[str | Composition, ...] = tuple(members)

    # -- structure ---------------------------------------------------------------------------------
    def names(self) -> tuple[str, ...]:
        """Every delta name in the tree (members, then e.g. the fusion delta), in order."""
        out: list[str] = []
        for m in self.members:
            out += [m] if isinstance(m, str) else list(m.names())
        return tuple(out + list(self.extra_names()))

    def extra_names(self) -> tuple[str, ...]:
        return ()

    def leaves(self) -> tuple[str, ...]:
        """Delta names that run as members (not as a combiner)."""
        out: list[str] = []
        for m in self.members:
            out += [m] if isinstance(m, str) else list(m.leaves())
        return tuple(out)

    def frozen(self) -> tuple[str, ...]:
        """Deltas whose parameters stay frozen while this composition is active."""
        out: list[str] = []
        for m in self.members:
            if isinstance(m, Composition):
                out += m.frozen()
        return tuple(out)

    def is_plain_stack(self) -> bool:
        return False

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind,
                "members": [m if isinstance(m, str) else m.to_dict() for m in self.members]}

    def __repr__(self) -> str:
        inner = ", ".join(repr(m) for m in self.members)
        return f"{type(self).__name__}({inner})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Composition) and self.to_dict() == other.to_dict()

    __hash__ = object.__hash__

    # -- evaluation on one module call ----------------------------------------------------------
    def run(self, call: Call, y: Any) -> Any:
        raise NotImplementedError

    def branch(self, i: int, call: Call, y: Any) -> Any:
        """Member i's output; module calls re-run inside it see member i only."""
        with call.context.branch(self, i):
            return evaluate(self.members[i], call, y)

    def chosen_branch(self, call: Call) -> int | None:
        return call.context.chosen_branch(self)


def evaluate(member: str | Composition, call: Call, y: Any) -> Any:
    node = member if isinstance(member, Composition) else Stack(member)
    return node.run(call, y)


class Stack(Composition):
    kind = "stack"
    min_members = 0

    def is_plain_stack(self) -> bool:
        return all(isinstance(m, str) or m.is_plain_stack() for m in self.members)

    def run(self, call: Call, y: Any) -> Any:
        own = [call.layer(m) for m in self.members if isinstance(m, str)]
        heavy = [lay for lay in own if lay is not None and (type(lay).uses().pre or type(lay).uses().params)]
        if heavy:  # weights or inputs change: the module itself runs again (before any output change)
            y = rerun(call, heavy)
        for m in self.members:
            if isinstance(m, Composition):
                y = m.run(call, y)
                continue
            layer = call.layer(m)
            if layer is not None and type(layer).uses().post:
                y = layer.forward_post(call.module, call.args, call.kwargs, y)
        return y


class Parallel(Composition):
    kind = "parallel"
    min_members = 2

    def replicate(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The model's inputs with every batch-first tensor repeated once per member."""
        t = first_tensor((args, kwargs))
        if t is None or not t.dim():
            return args, kwargs
        n, rows = len(self.members), t.shape[0]
        return repeat_rows(args, n, rows), repeat_rows(kwargs, n, rows)

    def run(self, call: Call, y: Any) -> Any:
        chosen = self.chosen_branch(call)
        if chosen is not None:
            return evaluate(self.members[chosen], call, y)
        n = len(self.members)
        total = main_tensor(y).shape[0]
        if total % n:
            raise ConfigError(
                f"Parallel with {n} members: module {call.host.path or '<model>'} got a batch of "
                f"{total} rows, not a multiple of {n}. Parallel needs batch-first inputs; pass the "
                f"inputs to the model itself (it replicates them)."
            )
        b = total // n
        spans = [(i * b, (i + 1) * b) for i in range(n)]
        parts = [self.branch(i, call.rows(lo, hi, total), split_rows(y, lo, hi, total))
                 for i, (lo, hi) in enumerate(spans)]
        return cat_rows(parts, y, total)


class Average(Composition):
    kind = "average"

    def __init__(self, *members: str | Composition, weights: list[float] | None = None):
        super().__init__(*members)
        n = len(self.members)
        w = [1.0] * n if weights is None else [float(v) for v in weights]
        if len(w) != n:
            raise ConfigError(f"Average got {len(w)} weights for {n} members: give one per member.")
        if abs(sum(w)) < 1e-12:
            raise ConfigError(f"Average weights {w} sum to zero: they are normalized to sum 1.")
        self.weights = tuple(v / sum(w) for v in w)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "weights": list(self.weights)}

    def run(self, call: Call, y: Any) -> Any:
        chosen = self.chosen_branch(call)
        if chosen is not None:
            return evaluate(self.members[chosen], call, y)
        outs = [self.branch(i, call, y) for i in range(len(self.members))]
        if all(o is y for o in outs):
            return y
        mixed = sum(w * main_tensor(o) for w, o in zip(self.weights, outs))
        return replace_main(y, mixed)


class Fuse(Composition):
    kind = "fuse"

    def __init__(self, *members: str | Composition, fusion: str | None = None):
        super().__init__(*members)
        if not isinstance(fusion, str):
            raise ConfigError(
                "Fuse needs fusion='<name>': a delta of method 'fusion' added with "
                "dm.add(name, FusionConfig(...)) that learns how to mix the members."
            )
        if fusion in self.leaves():
            raise ConfigError(f"fusion delta {fusion!r} is also a member of {self!r}.")
        self.fusion = fusion

    def extra_names(self) -> tuple[str, ...]:
        return (self.fusion,)

    def frozen(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.leaves() + super().frozen()))

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "fusion": self.fusion}

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, fusion={self.fusion!r})"

    def run(self, call: Call, y: Any) -> Any:
        chosen = self.chosen_branch(call)
        if chosen is not None:
            return evaluate(self.members[chosen], call, y)
        layer = call.layer(self.fusion)
        if layer is not None and not isinstance(layer, CombiningLayer):  # the fusion's own head, say:
            return Stack(self.fusion).run(call, y)  # it replaces the members' layers here
        outs = [self.branch(i, call, y) for i in range(len(self.members))]
        if all(o is y for o in outs):  # the members only observe this module (an input tap)
            return y
        if layer is None:
            raise ConfigError(
                f"fusion delta {self.fusion!r} has no layer at {call.host.path or '<model>'}, where its "
                f"members act: build the fusion with the members' placement (e.g. placement='houlsby')."
            )
        return layer.combine(call.module, call.args, call.kwargs, y, outs)


KINDS: dict[str, type[Composition]] = {c.kind: c for c in (Stack, Parallel, Average, Fuse)}


def build(names: tuple[str | Composition, ...], composition: str | Composition = "stack",
          weights: list[float] | None = None, fusion: str | None = None) -> Composition:
    """The composition object for ``activate(*names, composition=..., weights=..., fusion=...)``."""
    if isinstance(composition, Composition):
        if names:
            raise ConfigError("pass either delta names or a composition object, not both.")
        return composition
    if len(names) == 1 and isinstance(names[0], Composition) and composition == "stack":
        return names[0]
    if composition not in KINDS:
        raise ConfigError(f"composition={composition!r} is unknown: use one of {', '.join(KINDS)}.")
    options: dict[str, Any] = {}
    if weights is not None:
        if composition != "average":
            raise ConfigError("weights= applies to composition='average' only.")
        options["weights"] = weights
    if fusion is not None or composition == "fuse":
        if composition != "fuse":
            raise ConfigError("fusion= applies to composition='fuse' only.")
        options["fusion"] = fusion
    return KINDS[composition](*names, **options)


def from_dict(data: dict[str, Any]) -> Composition:
    members = [m if isinstance(m, str) else from_dict(m) for m in data["members"]]
    options = {k: data[k] for k in ("weights", "fusion") if k in data}
    return KINDS[data["kind"]](*members, **options)


def walk(node: Composition) -> Iterator[Composition]:
    yield node
    for m in node.members:
        if isinstance(m, Composition):
            yield from walk(m)


def check(node: Composition, delta_of: Callable[[str], Any]) -> None:
    """Names unique; combiner deltas (fusion) only as a Fuse's fusion, and only they there."""
    names = node.names()
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{node!r} uses {dup} twice: each delta can appear once.")
    for n in node.leaves():
        if delta_of(n).combiner:
            raise ConfigError(
                f"delta {n!r} combines other deltas and cannot run by itself: activate it as a "
                f"fusion, e.g. activate('a', 'b', composition='fuse', fusion={n!r})."
            )
    for sub in walk(node):
        if isinstance(sub, Fuse) and not delta_of(sub.fusion).combiner:
            raise ConfigError(f"delta {sub.fusion!r} ({delta_of(sub.fusion).config.method}) cannot "
                              f"fuse other deltas: pass a delta of method 'fusion' as fusion=.")
