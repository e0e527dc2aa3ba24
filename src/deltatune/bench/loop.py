"""One training run on `accelerate`: the same code on CPU, CUDA, in mixed precision and under
``accelerate launch`` / ``torchrun`` with several processes (accelerate shards the batches and
all-reduces the trainable tensors' gradients).

Per run: the dev metric every ``eval_every`` steps (step 0: the untrained model's score, measured
once per task and seed by the suite), the training loss per step, step times, throughput and peak memory. The delta's ``regularization()`` is added
to the loss and ``step(i)`` is called after every optimizer step (schedules, pruning phases).
"""
from __future__ import annotations

import io
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import metrics as M
from .checkpoint import (DELTA_DIR, Checkpointer, TrainingStopped, restore_trainable,
                         set_rng_state, trainable_state)
from .data import Collator, Encoded, dev_indices, encode, length_order, pad_id, reorder
from .gendata import LMCollator
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
    max_length: int = 96  # RTE pairs dominate the default run's time; 96 keeps it within 10 minutes
    eval_batch_size: int = 64
    warmup: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    group_by_length: bool = True
    # generation tasks only (not part of a classification cell's key)
    max_new_tokens: int = 64
    num_beams: int = 1
    loss_on_prompt: bool = False  # False: the loss is on the completion tokens only
    pack: bool = False  # several short examples per row (causal LM), kept apart by position ids

    def validate(self) -> None:
        from ..errors import ConfigError

        for name in ("steps", "batch_size", "eval_every", "max_length", "eval_batch_size", "max_new_tokens",
                     "num_beams"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1.")
        if self.max_length < MIN_LENGTH:
            raise ConfigError(f"max_length={self.max_length} leaves no room for text next to the special "
                              f"tokens: use --max-length >= {MIN_LENGTH}.")
        if self.dev_size < 0 or not 0 <= self.warmup < 1 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError(f"budget {asdict(self)}: dev_size >= 0, 0 <= warmup < 1, weight_decay >= 0 "
                              f"and grad_clip >= 0 (0: no clipping) are required.")

    def to_dict(self, generative: bool = True) -> dict[str, Any]:
        """The budget's fields; without the generation-only ones for other tasks."""
        out = asdict(self)
        return out if generative else {k: v for k, v in out.items() if k not in GEN_FIELDS}


MIN_LENGTH = 8  # tokens: [CLS] / bos, separators and eos, and some text

GEN_FIELDS = ("max_new_tokens", "num_beams", "loss_on_prompt", "pack")


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
        # several CPU processes (torchrun without CUDA): accelerate joins them (gloo) only with cpu=True
        multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        _ACCELERATORS[key] = Accelerator(cpu=device == "cpu" or (device == "auto" and multi_cpu),
                                         mixed_precision=mixed_precision)
    return _ACCELERATORS[key]


def linear_schedule(optimizer, steps: int, warmup: float, start: int = 0):
    """Warm-up then linear decay; ``start``: the steps already taken (a new optimizer mid-run)."""
    warm = max(1, round(steps * warmup)) if warmup > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (steps - step) / max(1, steps - warm))

    for group in optimizer.param_groups:  # what LambdaLR needs to start past step 0
        group.setdefault("initial_lr", group["lr"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start - 1)


@torch.no_grad()
def outputs(model, loader, acc) -> tuple[np.ndarray, np.ndarray]:
    """(logits, gold labels) on `loader`, gathered across processes, in the loader's order."""
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
    return np.concatenate(logits), np.concatenate(labels)


def evaluate(model, loader, task: Task, acc) -> dict[str, float]:
    """Every task metric on `loader` (gathered across processes)."""
    return M.score(task, *outputs(model, loader, acc))


class ClassScorer:
    """Dev metrics of a classification / regression task (the loader prepared once per accelerator).

    ``ids``: each dev example's index in the dev split, in the scored order. After every call,
    ``last`` holds that evaluation's per-example predictions and gold labels, sorted by id: what
    the statistics need for a bootstrap over examples and for pairing two methods example by
    example (`stats`, `compare`)."""

    def __init__(self, dev: Encoded, task: Task, pad: int, batch_size: int, ids: list[int] | None = None):
        self.dev, self.task, self.pad, self.batch_size = dev, task, pad, batch_size
        self.ids = list(range(len(dev))) if ids is None else list(ids)
        self._loader: tuple[Any, Any] | None = None
        self.last: dict[str, list] | None = None

    def __len__(self) -> int:
        return len(self.dev)

    def __call__(self, model, acc) -> dict[str, float]:
        if self._loader is None or self._loader[0] is not acc:
            dl = DataLoader(self.dev, batch_size=self.batch_size, collate_fn=Collator(self.pad, self.task.regression))
            self._loader = (acc, acc.prepare(dl))
        logits, gold = outputs(model, self._loader[1], acc)
        pred = M.predictions(self.task, np.asarray(logits, dtype=np.float64))
        order = np.argsort(self.ids, kind="stable")
        cast = float if self.task.regression else int
        self.last = {"ids": [self.ids[i] for i in order], "pred": [cast(pred[i]) for i in order],
                     "gold": [cast(gold[i]) for i in order]}
        return M.score(self.task, logits, gold)


def dev_scorer(task: Task, dev, tokenizer, dev_size: int, max_length: int, batch_size: int,
               max_new_tokens: int = 64, num_beams: int = 1):
    """The dev metric of `task` on a fixed subset of `dev`: a `genscore.GenScorer` over
    ``dev_size`` distinct inputs for generation tasks, else a `ClassScorer`."""
    from .genscore import LOSS_BATCH, GenScorer, gen_dev

    pad = pad_id(tokenizer)
    if task.generative:
        return GenScorer(gen_dev(tokenizer, task, dev, dev_size, max_length), task, tokenizer, pad,
                         max_new_tokens, num_beams, min(batch_size, LOSS_BATCH))
    ids = dev_indices(len(dev), dev_size)
    data = encode(tokenizer, dev.subset(ids), max_length, task.regression)
    order = length_order(data)
    return ClassScorer(reorder(data, order), task, pad, batch_size, ids=[ids[i] for i in order])


def score_model(model, scorer, acc) -> dict[str, float]:
    """Dev metrics of a model outside a training run."""
    model = acc.prepare(model)
    out = scorer(model, acc)
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


class TrainingRun:
    """One training run of `model` (its optimizer `groups`), scoring dev along the way.

    ``train``: encoded examples (`data.Encoded`, or `gendata.LMEncoded` for generation tasks);
    ``scorer(model, acc) -> metrics``: the dev metrics (`ClassScorer`, `genscore.GenScorer`);
    ``delta``: the DeltaModel whose ``regularization()`` joins the loss and whose ``step(i)`` runs
    after every optimizer step; ``regroup()``: the optimizer groups again, called when a delta
    replaced its trainable tensors (``param_version`` changed, e.g. LT-SFT's phase 2): a new
    optimizer continues the schedule from there.
    """

    def __init__(self, model, groups, task: Task, train, scorer, budget: Budget, pad: int, acc,
                 delta=None, regroup=None):
        self.task, self.scorer, self.budget, self.acc = task, scorer, budget, acc
        self.delta, self.regroup = delta, regroup
        collate = LMCollator(pad) if task.generative else Collator(pad, task.regression)
        loader = DataLoader(train, batch_size=budget.batch_size, shuffle=False, collate_fn=collate)
        opt = torch.optim.AdamW(groups, weight_decay=budget.weight_decay)
        # the schedule is per optimizer step: not prepared, since accelerate would step it once per process
        self.sched = linear_schedule(opt, budget.steps, budget.warmup)
        self.model, self.opt, self.loader = acc.prepare(model, opt, loader)
        self.params = [p for g in groups for p in g["params"]]
        self.version = getattr(delta, "param_version", 0)
        self.comm = count_communication(self.model)
        self.curve: list[dict[str, Any]] = []
        self.losses: list[float] = []
        self.times: list[float] = []

    def run(self, progress=None, start: dict[str, float] | None = None, ckpt: Checkpointer | None = None,
            monitor=None) -> dict[str, Any]:
        """Train every step; returns the measurements.

        ``start``: dev metrics at step 0, when the caller has them (the untrained model's, shared
        by the runs of one task and seed); else they are measured here. ``ckpt``: checkpoint every
        ``ckpt.every`` steps and resume from its last checkpoint (same numbers as an unbroken run).
        A non-finite loss or gradient stops the run before the optimizer step (``TrainingError``).
        ``monitor(step, point)``: called after every step with the new dev curve point (None
        between evaluations); it may raise to stop the run (a search's pruning or time limit)."""
        resumed = ckpt.load() if ckpt is not None else None
        first = self._restore(resumed) if resumed is not None else self._begin(start)
        if progress is not None and first:
            progress.update(first)
        self.model.train()
        with PeakMemory(self.acc.device) as mem:
            for step, batch in enumerate(self.loader):
                if step < first:
                    continue  # the data position: these batches were trained on before the checkpoint
                if resumed is not None and step == first:
                    set_rng_state(resumed["rng"][self.acc.process_index])
                value = self._step(step, batch, ckpt)
                done = step + 1
                point = self._evaluate(done)
                if ckpt is not None and ckpt.due(done, self.budget.steps):
                    self._checkpoint(ckpt, done)
                if monitor is not None:
                    monitor(done, point)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{value:.3f}",
                                         **{M.SHORT[self.task.metric]: f"{100 * self.curve[-1]['metric']:.1f}"})
                if ckpt is not None and ckpt.stop_after == done:
                    raise TrainingStopped(f"stopped after step {done} (stop_after)")
        return self._result(mem)

    def _begin(self, start: dict[str, float] | None) -> int:
        start = start if start is not None else self.scorer(self.model, self.acc)
        self.curve = [{"step": 0, "seconds": 0.0, "metric": start[self.task.metric], "metrics": start}]
        return 0

    def _restore(self, resumed: dict[str, Any]) -> int:
        restore_trainable(resumed["trainable"], self.params, self.delta)
        self.opt.load_state_dict(resumed["optimizer"])
        self.sched.load_state_dict(resumed["scheduler"])
        self.curve, self.losses, self.times = resumed["curve"], resumed["losses"], resumed["times"]
        return resumed["step"]

    def _step(self, step: int, batch: dict[str, Any], ckpt) -> float:
        """One optimizer step (and the delta's schedule step); returns the loss."""
        t0 = time.perf_counter()
        loss = self.model(**batch).loss
        if self.delta is not None:
            loss = loss + self.delta.regularization()
        self.acc.backward(loss)
        norm = grad_norm(self.params, self.budget.grad_clip, self.acc)
        check_finite(loss, norm, step + 1, self.acc, ckpt, self.opt)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if self.delta is not None:
            self.delta.step(step)
            if self.delta.param_version != self.version:
                self.version = self.delta.param_version
                self.opt, self.sched, self.params = new_optimizer(self.regroup, self.budget, self.acc, step + 1)
        _sync(self.acc.device)
        self.times.append(time.perf_counter() - t0)
        self.losses.append(float(loss.detach()))
        return self.losses[-1]

    def _evaluate(self, done: int) -> dict[str, Any] | None:
        """A dev curve point every ``eval_every`` steps and at the end (None in between)."""
        if done % self.budget.eval_every and done != self.budget.steps:
            return None
        m = self.scorer(self.model, self.acc)
        self.curve.append({"step": done, "seconds": sum(self.times), "metric": m[self.task.metric], "metrics": m})
        return self.curve[-1]

    def _checkpoint(self, ckpt: Checkpointer, done: int) -> None:
        ckpt.save({"step": done, "trainable": trainable_state(self.params, self.delta),
                   "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                   "curve": self.curve, "losses": self.losses, "times": self.times}, self.acc, self.delta)

    def _result(self, mem: PeakMemory) -> dict[str, Any]:
        seconds, times = sum(self.times), self.times
        examples = self.budget.steps * self.budget.batch_size * self.acc.num_processes
        return {
            "metrics": self.curve[-1]["metrics"], "metric": self.curve[-1]["metric"], "curve": self.curve,
            "loss": self.losses, "convergence": convergence(self.curve),
            "train_seconds": seconds, "step_time_median": statistics.median(times) if times else None,
            "step_time_mean": seconds / len(times) if times else None,
            "throughput": examples / seconds if seconds else None,
            "peak_mem_mb": mem.peak_mb, "mem_start_mb": mem.start_mb, "mem_kind": mem.kind,
            "other_cpu": mem.others,
            "comm_bytes_per_step": self.comm.per_step() if self.comm is not None else 0,
            "model": self.model,
        }


def new_optimizer(regroup, budget: Budget, acc, done: int):
    """A fresh AdamW over ``regroup()``'s groups, its schedule advanced to step `done`."""
    from ..errors import TrainingError

    if regroup is None:
        raise TrainingError("a delta replaced its trainable tensors during the run, but the loop was "
                            "given no regroup() to build the new optimizer groups.")
    groups = regroup()
    opt = torch.optim.AdamW(groups, weight_decay=budget.weight_decay)
    sched = linear_schedule(opt, budget.steps, budget.warmup, start=done)
    return acc.prepare(opt), sched, [p for g in groups for p in g["params"]]


def grad_norm(params: list[torch.Tensor], clip: float, acc) -> torch.Tensor:
    """The total gradient norm (clipping to `clip` when it is > 0)."""
    if clip > 0:
        return acc.clip_grad_norm_(params, clip)
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros(())


def check_finite(loss: torch.Tensor, norm: torch.Tensor, step: int, acc, ckpt, opt) -> None:
    """Stop (on every process alike) when the loss or the gradient norm is not finite. Under fp16
    an overflowing gradient is the loss scaler's business (it skips the step): only the loss counts."""
    grads_ok = math.isfinite(float(norm)) or acc.mixed_precision == "fp16"
    bad = torch.tensor([not math.isfinite(float(loss.detach())) or not grads_ok],
                       device=acc.device, dtype=torch.float32)
    if acc.num_processes > 1:
        bad = acc.reduce(bad, reduction="sum")
    if not float(bad):
        return
    opt.zero_grad(set_to_none=True)
    from ..errors import TrainingError

    last = _last_checkpoint(ckpt)
    raise TrainingError(
        f"training stopped at step {step}: the loss is {float(loss.detach())} and the gradient norm "
        f"{float(norm)}, not finite. The weights were not updated at this step. {last} Lower the "
        f"learning rate (--lr), keep gradient clipping on, or check the inputs for extreme values.")


def _last_checkpoint(ckpt) -> str:
    if ckpt is None or ckpt.every <= 0:
        return "No checkpoint was written (checkpointing is off)."
    if not ckpt.file.exists():
        return f"No checkpoint was written yet (every {ckpt.every} steps)."
    step = torch.load(io.BytesIO(ckpt.file.read_bytes()), weights_only=True)["step"]
    return (f"The last good checkpoint is step {step}, in {ckpt.directory} (its delta: "
            f"{ckpt.directory}/{DELTA_DIR}, loadable with deltatune.load).")


class _CommCounter:
    """Bytes this process hands to DDP's gradient all-reduce (one bucket at a time)."""

    def __init__(self) -> None:
        self.bytes, self.calls, self.steps = 0, 0, 0

    def hook(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        buf = bucket.buffer()
        self.bytes += buf.numel() * buf.element_size()
        self.calls += 1
        if bucket.is_last():
            self.steps += 1
        return default_hooks.allreduce_hook(None, bucket)

    def per_step(self) -> float:
        return self.bytes / max(self.steps, 1)


def count_communication(model) -> _CommCounter | None:
    """Count what DDP all-reduces (only parameters that require gradients: the delta's)."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        return None
    counter = _CommCounter()
    model.register_comm_hook(None, counter.hook)
    return counter


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)



