"""One training run on `accelerate`: the same code on CPU, CUDA, in mixed precision and under
``accelerate launch`` / ``torchrun`` with several processes (accelerate shards the batches and
all-reduces the trainable tensors' gradients).

Per run: the dev metric every ``eval_every`` steps (step 0: the untrained model's score, measured
once per task and seed by the suite), the training loss per step, step times, throughput and peak memory. The delta's ``regularization()`` is added
to the loss and ``step(i)`` is called after every optimizer step (schedules, pruning phases).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import metrics as M
from .data import Collator, Encoded
from .measure import PeakMemory
from .tasks import Task

_ACCELERATORS: dict[tuple[str, str], Any] = {}


@dataclass
class Budget:
    """How much each run trains and how it is measured. Train data: ``steps * batch_size`` examples
    drawn by the seed from the train split (x the number of processes); dev: a fixed subset of
    ``dev_size`` examples (0: all of dev)."""

    steps: int = 30
    batch_size: int = 16
    eval_every: int = 10
    dev_size: int = 128
    max_length: int = 128
    eval_batch_size: int = 64
    warmup: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    group_by_length: bool = True

    def validate(self) -> None:
        from ..errors import ConfigError

        for name in ("steps", "batch_size", "eval_every", "max_length", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1.")
        if self.dev_size < 0 or not 0 <= self.warmup < 1 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError(f"budget {asdict(self)}: dev_size >= 0, 0 <= warmup < 1, weight_decay >= 0 "
                              f"and grad_clip >= 0 (0: no clipping) are required.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def accelerator(device: str = "auto", mixed_precision: str = "no"):
    """One Accelerator per (device, precision) and process: accelerate's state is process-wide."""
    from accelerate import Accelerator

    from ..errors import ConfigError

    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device {device!r}: use auto, cpu or cuda.")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but torch sees no CUDA device: install a CUDA build of torch or use cpu.")
    key = (device, mixed_precision)
    if key not in _ACCELERATORS:
        _ACCELERATORS[key] = Accelerator(cpu=device == "cpu", mixed_precision=mixed_precision)
    return _ACCELERATORS[key]


def linear_schedule(optimizer, steps: int, warmup: float):
    warm = max(1, round(steps * warmup)) if warmup > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (steps - step) / max(1, steps - warm))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def evaluate(model, loader, task: Task, acc) -> dict[str, float]:
    """Every task metric on `loader` (gathered across processes)."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for batch in loader:
        gold = batch.pop("labels")
        out = model(**batch).logits.float()
        out, gold = acc.gather_for_metrics((out, gold))
        logits.append(out.cpu().numpy())
        labels.append(gold.cpu().numpy())
    model.train(was_training)
    return M.score(task, np.concatenate(logits), np.concatenate(labels))


def score_model(model, dev: Encoded, task: Task, batch_size: int, pad: int, acc) -> dict[str, float]:
    """Dev metrics of a model outside a training run."""
    loader = DataLoader(dev, batch_size=batch_size, collate_fn=Collator(pad, task.regression))
    model, loader = acc.prepare(model, loader)
    out = evaluate(model, loader, task, acc)
    acc.free_memory()
    return out


def convergence(curve: list[dict[str, Any]]) -> dict[str, Any]:
    """Best dev metric and the first step (and training seconds) reaching 90% of the gain from
    the start (step 0) to that best; None when the metric never rose above its start."""
    start, best = curve[0]["metric"], max(c["metric"] for c in curve)
    best_at = next(c for c in curve if c["metric"] == best)
    out = {"best": best, "best_step": best_at["step"], "start": start, "steps_to_90": None, "seconds_to_90": None}
    if best > start:
        goal = start + 0.9 * (best - start)
        hit = next(c for c in curve if c["metric"] >= goal)
        out.update(steps_to_90=hit["step"], seconds_to_90=hit["seconds"])
    return out


def train_run(model, groups, task: Task, train: Encoded, dev: Encoded, budget: Budget, pad: int,
              acc, delta=None, progress=None, start: dict[str, float] | None = None,
              monitor=None) -> dict[str, Any]:
    """Train `model` (its optimizer `groups`), scoring dev along the way; returns the measurements.

    ``start``: dev metrics at step 0, when the caller has them (the untrained model's, shared by
    the runs of one task and seed); else they are measured here. ``monitor(step, point)``: called
    after every step with the new dev curve point (None between evaluations); it may raise to
    stop the run (a search's pruning or time limit)."""
    collate = Collator(pad, task.regression)
    train_dl = DataLoader(train, batch_size=budget.batch_size, shuffle=False, collate_fn=collate)
    dev_dl = DataLoader(dev, batch_size=budget.eval_batch_size, shuffle=False, collate_fn=collate)
    opt = torch.optim.AdamW(groups, weight_decay=budget.weight_decay)
    sched = linear_schedule(opt, budget.steps, budget.warmup)
    model, opt, train_dl, dev_dl, sched = acc.prepare(model, opt, train_dl, dev_dl, sched)
    params = [p for g in groups for p in g["params"]]
    start = start if start is not None else evaluate(model, dev_dl, task, acc)
    curve = [{"step": 0, "seconds": 0.0, "metric": start[task.metric], "metrics": start}]
    losses, times = [], []
    model.train()
    with PeakMemory(acc.device) as mem:
        for step, batch in enumerate(train_dl):
            t0 = time.perf_counter()
            loss = model(**batch).loss
            if delta is not None:
                loss = loss + delta.regularization()
            acc.backward(loss)
            if budget.grad_clip > 0:
                acc.clip_grad_norm_(params, budget.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if delta is not None:
                delta.step(step)
            _sync(acc.device)
            times.append(time.perf_counter() - t0)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"the training loss is {value} at step {step + 1}: lower the learning rate.")
            losses.append(value)
            done = step + 1
            if done % budget.eval_every == 0 or done == budget.steps:
                m = evaluate(model, dev_dl, task, acc)
                curve.append({"step": done, "seconds": sum(times), "metric": m[task.metric], "metrics": m})
            if monitor is not None:
                monitor(done, curve[-1] if curve[-1]["step"] == done else None)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{value:.3f}", **{M.SHORT[task.metric]: f"{100 * curve[-1]['metric']:.1f}"})
    seconds = sum(times)
    examples = budget.steps * budget.batch_size * acc.num_processes
    return {
        "metrics": curve[-1]["metrics"], "metric": curve[-1]["metric"], "curve": curve, "loss": losses,
        "convergence": convergence(curve),
        "train_seconds": seconds, "step_time_median": statistics.median(times),
        "step_time_mean": seconds / len(times), "throughput": examples / seconds if seconds else None,
        "peak_mem_mb": mem.peak_mb, "mem_start_mb": mem.start_mb, "mem_kind": mem.kind,
        "model": model,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)



