"""CallContext: what the parts of one forward pass leave for each other, under explicit names.

Why one object: a layer sometimes needs what another layer computed earlier in the same call (a
parallel adapter reads its sublayer's input, seen at another module; a prefix gate reads the
cache its prefix layer filled), and a composition's branch must be seen by the module calls
nested inside it. Holding references to other layers, or a module-global variable, hides that
flow; here it is a named value on an object that the DeltaModel owns and hands to its Hosts
(``Call.context``) and to its deltas' layers (``DeltaLayer.context``).

A value lives from ``put`` until its reader ``pop``s it: a forward pass leaves the context empty.
Keys name their writer, e.g. ``"<delta>:<module path>:input"``, so two deltas never share one.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any



class CallContext:
    def __init__(self) -> None:
        self._values: dict[str, Any] = {}
        self._branches: dict[int, int] = {}
        self._inputs: dict[str, Any] = {}

    # -- what the caller gave this call for the deltas (``dm(..., task_ids=t)``) -----------------
    @contextlib.contextmanager
    def inputs(self, **values: Any) -> Iterator[None]:
        """Inside the block, layers read these caller-given values (None ones are left out):
        they live for one model call, not until a reader pops them."""
        before = dict(self._inputs)
        self._inputs.update({k: v for k, v in values.items() if v is not None})
        try:
            yield
        finally:
            self._inputs = before

    def call_input(self, key: str, default: Any = None) -> Any:
        return self._inputs.get(key, default)

    # -- values layers pass on ----------------------------------------------------------------------
    def put(self, key: str, value: Any) -> None:
        self._values[key] = value

    def get(self, key: str, default: Any = None) -> Any:
        return self._values.get(key, default)

    def pop(self, key: str, default: Any = None) -> Any:
        return self._values.pop(key, default)

    def keys(self) -> list[str]:
        return list(self._values)

    # -- the composition branch being evaluated ---------------------------------------------------------
    @contextlib.contextmanager
    def branch(self, node: object, member: int) -> Iterator[None]:
        """Inside the block, module calls evaluate only member `member` of composition `node`."""
        before = self._branches.get(id(node))
        self._branches[id(node)] = member
        try:
            yield
        finally:
            if before is None:
                del self._branches[id(node)]
            else:
                self._branches[id(node)] = before

    def chosen_branch(self, node: object) -> int | None:
        return self._branches.get(id(node))

