"""Training checkpoints: a run killed at any moment resumes to the same numbers, bit for bit.

One checkpoint is one file, ``<dir>/trainer_state.pt``, written atomically (core/state.py's
``atomic_write``: a kill mid-write leaves the previous one), holding everything that decides the
rest of the run: the trainable tensors (and the deltas' buffers and extra state), the optimizer
and scheduler states, every process's RNG states (torch, CUDA, numpy, Python), the number of steps
done (the data position: the training order is fixed by the seed, so resuming skips that many
batches) and the measurements so far (dev curve, losses, step times). It is read back with
``torch.load(weights_only=True)``, which rebuilds tensors and plain containers only and never runs
code from the file. Beside it, ``<dir>/delta`` holds the delta at that step in deltatune's format
(``deltatune.load`` reads it): the last good state when a run stops on a non-finite loss.
"""
from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.state import atomic_write
from ..errors import CheckpointError

STATE_FILE = "trainer_state.pt"
DELTA_DIR = "delta"


class TrainingStopped(Exception):
    """Raised by ``stop_after``: the run stopped on purpose after that many steps (to test resume)."""


@dataclass
class Checkpointer:
    """Where and how often a run checkpoints. ``key`` identifies the run: a checkpoint written by
    another configuration is refused. ``stop_after``: stop after that many steps, as if killed."""

    directory: Path
    every: int
    key: str
    stop_after: int | None = None
    resume: bool = True

    @property
    def file(self) -> Path:
        return Path(self.directory) / STATE_FILE

    def due(self, done: int, total: int) -> bool:
        return self.every > 0 and (done % self.every == 0 or done == total)

    def load(self) -> dict[str, Any] | None:
        if not self.resume or not self.file.exists():
            return None
        try:
            state = torch.load(io.BytesIO(self.file.read_bytes()), weights_only=True)
        except Exception as e:  # a corrupt or foreign file: refuse it, never unpickle freely
            raise CheckpointError(f"{self.file} is not a readable training checkpoint ({e}): delete it "
                                  f"(or pass --restart) to train from the start.") from e
        if not isinstance(state, dict) or state.get("key") != self.key:
            raise CheckpointError(
                f"{self.file} belongs to another run (model, task, method, seed, budget or number of "
                f"processes differ): use another --out, or pass --restart to overwrite it.")
        return state

    def save(self, state: dict[str, Any], acc, delta=None) -> None:
        """Every process calls this (RNG states are gathered); the main process writes."""
        rngs = gather_rng(acc)
        if acc.is_main_process:
            buf = io.BytesIO()
            torch.save({**state, "key": self.key, "rng": rngs}, buf)
            if delta is not None:
                delta.save(Path(self.directory) / DELTA_DIR)
            atomic_write(self.file, buf.getvalue())
        acc.wait_for_everyone()


# -- RNG states ------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's RNG states, as tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    out = {"torch": torch.get_rng_state(), "python": json.dumps(random.getstate()),
           "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                     "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng(acc) -> list[dict[str, Any]]:
    """Every process's RNG states, in process order (one entry on a single process)."""
    mine = rng_state()
    if acc.num_processes == 1:
        return [mine]
    from accelerate.utils import gather_object

    return gather_object([mine])


# -- trainable state ------------------------------------------------------------------------------
def trainable_state(params: list[torch.nn.Parameter], delta=None) -> dict[str, Any]:
    """The trained tensors: the optimizer's parameters in order, plus the deltas' buffers and
    extra state (training statistics some methods keep outside their parameters)."""
    out: dict[str, Any] = {"params": [p.detach().cpu().clone() for p in params]}
    if delta is not None:
        out["buffers"] = {k: b.detach().cpu().clone() for k, b in delta.delta_modules.named_buffers()}
        out["extra"] = {n: json.dumps(delta.get_delta(n).extra_state(), sort_keys=True) for n in delta.deltas}
    return out


@torch.no_grad()
def restore_trainable(state: dict[str, Any], params: list[torch.nn.Parameter], delta=None) -> None:
    saved = state["params"]
    if len(saved) != len(params) or any(tuple(s.shape) != tuple(p.shape) for s, p in zip(saved, params)):
        raise CheckpointError("the checkpoint's trainable tensors do not fit this run's: delete it or "
                              "pass --restart.")
    if delta is not None:
        for n, extra in state.get("extra", {}).items():
            if json.dumps(delta.get_delta(n).extra_state(), sort_keys=True) != extra:
                delta.get_delta(n).load_extra_state(json.loads(extra))
        own = dict(delta.delta_modules.named_buffers())
        for k, b in state.get("buffers", {}).items():
            if k in own and own[k].shape == b.shape:
                own[k].copy_(b)
    for s, p in zip(saved, params):
        p.copy_(s.to(p.device, p.dtype))
