"""The search loop: optuna's TPE sampler proposes configurations, the bench loop trains each, and
successive halving (optuna's pruner) stops the weak ones early, all inside a wall-clock budget.

Every trial is one ordinary bench training run (``Runner.train``) with the search seed, scored on
a dev split carved from the task's train split (the task's own dev split stays untouched for the
final evaluation). Intermediate dev scores (every ``eval_every`` steps) are the fidelities the
pruner compares; a trial's score is its final dev score, so retraining the returned configuration
with the same seed reproduces it. Configurations over the trainable-parameter budget are rejected
before training (counted with the task head).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..bench.loop import Budget
from ..bench.methods import build, parse_method
from ..bench.suite import Runner, SuiteConfig
from ..bench.tasks import Task, parse_task
from ..core.targets import num_layers
from ..errors import ConfigError
from .space import OFF, Candidate, parse_space, spec_of

RESULT_FILE = "search_result.json"
SEARCH_DEV_SEED = 1234  # the carved dev split is the same for every search seed


class _TimeUp(Exception):
    """The wall-clock budget ran out inside a trial."""


def carve_dev(task: Task, size: int) -> Task:
    """The task with ``size`` train examples (a fixed random subset) as its dev split, the rest as
    train."""

    def read(split: str, data_dir: str | None):
        full = task.read("train", data_dir)
        if size < 1 or size >= len(full):
            raise ConfigError(f"search dev size {size} must be between 1 and {len(full) - 1} "
                              f"(the {task.name} train split has {len(full)} examples).")
        order = np.random.default_rng(SEARCH_DEV_SEED).permutation(len(full)).tolist()
        return full.subset(sorted(order[:size]) if split == "dev" else sorted(order[size:]))

    return dataclasses.replace(task, name=f"{task.name}[search]", reader=read,
                               source=f"{task.source}; dev = {size} examples carved from train",
                               extra={**task.extra, "spec": task.extra.get("spec", task.name)})


@dataclass
class SearchResult:
    """The best configuration: ``spec`` (a bench method spec), ``configs`` (the deltas' configs,
    in activation order), its dev ``score`` and ``trainable`` parameters; every trial's record."""

    spec: str
    configs: list[dict[str, Any]]
    score: float
    metric: str
    trainable: int
    trials: list[dict[str, Any]]
    elapsed: float
    settings: dict[str, Any]
    model: Any = field(default=None, repr=False)  # the trained DeltaModel of the best trial
    loss: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("model")
        return out

    def retrain(self) -> dict[str, Any]:
        """Train the best configuration again with the search's seed and settings; its record."""
        s = self.settings
        runner = Runner(suite_config(s))
        task = carve_dev(parse_task(s["task"]), s["dev_size"])
        record, _ = runner.train(task, parse_method(self.spec), s["seed"])
        return record

    def save(self, out: str | Path) -> Path:
        """The trained deltas (a normal saved delta directory) plus ``search_result.json``."""
        from ..bench.single import RESULT_FILE as TRAIN_FILE
        from ..core.state import atomic_write

        root = Path(out)
        self.model.save(root)
        atomic_write(root / RESULT_FILE, json.dumps(self.to_dict(), indent=2, sort_keys=True).encode())
        info = {"task_spec": self.settings["task"], "model": self.settings["model_label"], "saved": "delta",
                "method": self.spec, "budget": self.settings["budget"], "search_score": self.score}
        atomic_write(root / TRAIN_FILE, json.dumps(info, indent=2, sort_keys=True).encode())
        return root


def suite_config(s: dict[str, Any]) -> SuiteConfig:
    return SuiteConfig(model=s["model"], budget=Budget(**s["budget"]), data_dir=s["data_dir"],
                       device=s["device"], quiet=True, threads=s["threads"], lr=s["lr"])


def search(task: str = "SST-2", model: str | None = None, time_budget: float = 60.0,
           space: list[str] | None = None, max_params: int | None = None, max_percent: float | None = None,
           steps: int = 30, batch_size: int = 16, eval_every: int = 10, dev_size: int = 200,
           max_length: int = 128, seed: int = 0, n_trials: int | None = None, eta: int = 3,
           data_dir: str | None = None, device: str = "auto", threads: int | None = None,
           lr: float | None = None, out: str | Path | None = None, log=None) -> SearchResult:
    """Search methods x sizes x layers under a parameter budget within ``time_budget`` seconds.

    ``max_params`` / ``max_percent``: trainable parameters (with the task head) allowed, absolute
    or as % of the base model. ``lr``: one learning rate for every delta (default: the bench's
    per-method table; per candidate: ``lora:r=2|4,lr=1e-3``). ``eta``: successive halving's reduction factor. Returns the best
    completed trial (trained); ``out``: save it there. Raises ConfigError when no trial finished.
    """
    t0 = time.monotonic()
    if time_budget <= 0:
        raise ConfigError(f"time_budget={time_budget} must be > 0 seconds.")
    deadline = t0 + time_budget * 0.9  # the rest: a trial's uninterruptible set-up, saving the result
    from ..bench.models import model_label

    budget = Budget(steps=steps, batch_size=batch_size, eval_every=min(eval_every, steps), dev_size=0,
                    max_length=max_length)
    settings = {"task": task, "model": model, "model_label": model_label(model), "budget": budget.to_dict(),
                "seed": seed, "dev_size": dev_size, "data_dir": data_dir, "device": device,
                "threads": threads, "space": list(space or []), "time_budget": time_budget,
                "max_params": max_params, "max_percent": max_percent, "eta": eta, "lr": lr}
    cands = parse_space(space)
    settings["space"] = [c.label for c in cands]
    runner = Runner(suite_config(settings))
    the_task = carve_dev(parse_task(task), dev_size)
    base, _ = runner.models.get(the_task, seed)
    layers = num_layers(base)
    if not layers:
        raise ConfigError(f"the model has no numbered layers to place deltas in; the search needs them.")
    limit = _limit(max_params, max_percent, sum(p.numel() for p in base.parameters()))
    study = _study(seed, budget.eval_every, eta)
    state: dict[str, Any] = {"best": None, "trials": []}
    objective = _Objective(runner, the_task, cands, layers, seed, limit, deadline, state, log)
    study.optimize(objective, n_trials=n_trials, timeout=max(0.0, deadline - time.monotonic()),
                   callbacks=[lambda st, tr: st.stop() if time.monotonic() >= deadline else None])
    best = state["best"]
    if best is None:
        raise ConfigError(f"no configuration finished training within {time_budget:g} s "
                          f"({len(state['trials'])} tried): raise the time budget, lower --steps, "
                          f"or loosen the parameter budget.")
    record, built = best
    result = SearchResult(spec=record["spec"], configs=[{k: v for k, v in c.items() if k != "lr"} for c in built.configs],
                          score=record["score"], metric=the_task.metric, trainable=built.trainable,
                          trials=state["trials"], elapsed=0.0, settings=settings, model=built.delta,
                          loss=record["loss"])
    if out is not None:
        result.save(out)
    result.elapsed = time.monotonic() - t0
    if out is not None:  # the elapsed time into the file too
        from ..core.state import atomic_write

        atomic_write(Path(out) / RESULT_FILE, json.dumps(result.to_dict(), indent=2, sort_keys=True).encode())
    return result


def _limit(max_params: int | None, max_percent: float | None, base: int) -> int | None:
    limits = [v for v in (max_params, None if max_percent is None else int(base * max_percent / 100)) if v is not None]
    if any(v <= 0 for v in limits):
        raise ConfigError(f"max_params / max_percent must be > 0, got {max_params} / {max_percent}.")
    return min(limits) if limits else None


def _study(seed: int, min_resource: int, eta: int):
    try:
        import optuna
    except ImportError as e:  # pragma: no cover - the `search` extra
        raise ImportError("deltatune search needs optuna: pip install 'deltatune[search]'") from e
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed)
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource, reduction_factor=eta)
    return optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)


class _Objective:
    """One optuna trial: sample a configuration, check its size, train it through the bench loop."""

    def __init__(self, runner: Runner, task: Task, cands: list[Candidate], layers: int, seed: int,
                 limit: int | None, deadline: float, state: dict[str, Any], log):
        self.runner, self.task, self.cands, self.layers = runner, task, cands, layers
        self.seed, self.limit, self.deadline, self.state, self.log = seed, limit, deadline, state, log

    def sample(self, trial) -> str:
        choices = {(ci, lay): trial.suggest_categorical(f"{c.label}@{lay}", list(range(len(c.sizes) + 1)))
                   for ci, c in enumerate(self.cands) for lay in range(self.layers)}
        return spec_of(choices, self.cands, self.layers)

    def trainable(self, spec) -> int:
        model, _ = self.runner.models.get(self.task, self.seed)
        return build(spec, model, self.runner.cfg.budget.steps).trainable

    def __call__(self, trial) -> float:
        import optuna

        if time.monotonic() >= self.deadline:
            trial.study.stop()
            raise optuna.TrialPruned("time budget reached")
        text = self.sample(trial)
        row: dict[str, Any] = {"number": trial.number, "spec": text}
        self.state["trials"].append(row)
        if not text:
            row["status"] = "empty"
            raise optuna.TrialPruned("no delta in any layer")
        spec = parse_method(text)
        row["trainable"] = self.trainable(spec)
        if self.limit is not None and row["trainable"] > self.limit:
            row["status"] = "over_budget"
            raise optuna.TrialPruned(f"{row['trainable']} trainable > {self.limit}")
        t0 = time.monotonic()
        try:
            if t0 >= self.deadline:
                raise _TimeUp
            record, built = self.runner.train(self.task, spec, self.seed, monitor=self._monitor(trial, row))
        except optuna.TrialPruned:
            row.update(status="pruned", seconds=time.monotonic() - t0)
            raise
        except _TimeUp:
            row.update(status="time_up", seconds=time.monotonic() - t0)
            trial.study.stop()
            raise optuna.TrialPruned("time budget reached") from None
        finally:
            self.runner.acc.free_memory()
        score = record["metric"]
        row.update(status="complete", score=score, seconds=time.monotonic() - t0)
        best = self.state["best"]
        if best is None or score > best[0]["score"]:
            self.state["best"] = ({"spec": text, "score": score, "loss": record["loss"]}, built)
        if self.log:
            self.log(f"trial {trial.number}: {self.task.metric} {score:.4f}, {row['trainable']:,} trainable: {text}")
        return score

    def _monitor(self, trial, row: dict[str, Any]):
        def check(step: int, point: dict[str, Any] | None) -> None:
            if time.monotonic() >= self.deadline:
                raise _TimeUp
            if point is not None:
                row["steps"] = step
                trial.report(point["metric"], step)
                if trial.should_prune():
                    raise __import__("optuna").TrialPruned(f"pruned at step {step}")
        return check


__all__ = ["OFF", "SearchResult", "carve_dev", "search"]
