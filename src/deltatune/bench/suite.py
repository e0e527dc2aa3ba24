"""The suite: methods x tasks x seeds, each cell one training run, results appended as they end.

A cell's key hashes everything that decides its numbers (model, task, method spec and learning
rates, seed, budget, device, precision); a cell whose key already has a successful line in
``results.jsonl`` is not run again, so an interrupted suite resumes where it stopped. Failed cells
are recorded with their error and retried on the next run.
"""
from __future__ import annotations

import copy
import hashlib
import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from . import report
from ..errors import ConfigError
from .data import encode, group_by_length, pad_id, train_indices
from .gendata import check_packing, encode_gen, pack
from .loop import Budget, TrainingRun, accelerator, dev_scorer, score_model
from .measure import environment
from .methods import MethodSpec, build, count_trainable, default_methods, parse_method
from .models import ModelCache, max_positions, model_label
from .tasks import Task, parse_task, verify_files, verify_glue

DEFAULT_TASKS = ("SST-2", "RTE")


@dataclass
class SuiteConfig:
    model: str | None = None
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    methods: list[str] | None = None  # None: full + every registered method + default combinations
    seeds: list[int] = field(default_factory=lambda: [0])
    budget: Budget = field(default_factory=Budget)
    out: str = "bench-out"
    data_dir: str | None = None
    device: str = "auto"
    mixed_precision: str = "no"
    lr: float | None = None
    head_lr: float | None = None
    resume: bool = True
    plots: bool = True
    quiet: bool = False
    threads: int | None = None  # torch CPU threads (None: torch's default)
    train: bool = True  # False: only write the summary and plots of the runs already done


def log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        from tqdm import tqdm

        tqdm.write(f"[deltatune bench] {msg}", file=sys.stderr)


class Runner:
    """Holds what the cells share: the accelerator, cached models and tokenised data."""

    def __init__(self, cfg: SuiteConfig):
        cfg.budget.validate()
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.acc = accelerator(cfg.device, cfg.mixed_precision)
        self.models = ModelCache(cfg.model)
        self._data: dict[tuple[Any, ...], Any] = {}
        self.notes: dict[str, dict[str, dict[str, int]]] = {}  # task -> split -> counted data changes
        self.env = environment(self.acc.device, self.acc.num_processes, cfg.mixed_precision)

    def quiet(self) -> bool:
        return self.cfg.quiet or not self.acc.is_main_process

    def key(self, task: Task, spec: MethodSpec, seed: int) -> str:
        ident = {"model": model_label(self.cfg.model), "task": task.name, "task_source": task.source,
                 "method": spec.label, "seed": seed, "budget": self.cfg.budget.to_dict(task.generative),
                 "lr": self.cfg.lr, "head_lr": self.cfg.head_lr, "device": self.acc.device.type,
                 "precision": self.cfg.mixed_precision, "processes": self.acc.num_processes}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]

    def base_record(self, task: Task, spec: MethodSpec, seed: int, key: str) -> dict[str, Any]:
        return {"key": key, "task": task.name, "task_spec": task.extra.get("spec", task.name),
                "metric_name": task.metric, "method": spec.label, "seed": seed,
                "model": model_label(self.cfg.model), "budget": self.cfg.budget.to_dict(task.generative),
                "kind": task.kind,
                "lr": self.cfg.lr, "head_lr": self.cfg.head_lr, "environment": self.env,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def data(self, task: Task, seed: int, tokenizer, model):
        """(train examples, dev scorer), tokenised once per task (and seed for train)."""
        b = self.cfg.budget
        length = min(b.max_length, max_positions(model) or b.max_length)
        if ("dev", task.name) not in self._data:
            scorer = dev_scorer(task, task.read("dev", self.cfg.data_dir), tokenizer, b.dev_size, length,
                                b.eval_batch_size, b.max_new_tokens, b.num_beams)
            if task.generative:
                self._report_notes(task, "dev", scorer.dev.notes)
            self._data[("dev", task.name)] = scorer
        tkey = ("train", task.name, seed)
        if tkey not in self._data:
            train = task.read("train", self.cfg.data_dir)
            rows = b.batch_size * self.acc.num_processes
            if task.generative and b.pack:
                if task.kind != "causal_lm":
                    raise ConfigError(f"packing is for causal-LM tasks; {task.name} is {task.kind}: turn it off.")
                data = pack(encode_gen(tokenizer, task, train, length, b.loss_on_prompt), b.steps * rows, length, seed)
            else:
                sub = train.subset(train_indices(len(train), b.steps, rows, seed))
                data = (encode_gen(tokenizer, task, sub, length, b.loss_on_prompt) if task.generative
                        else encode(tokenizer, sub, length, task.regression))
                if b.group_by_length:
                    lengths = [len(f["input_ids"]) for f in data.features]
                    data = data.reorder(group_by_length(lengths, rows, seed))
            if task.generative:
                self._report_notes(task, "train", data.notes)
            self._data[tkey] = data
        return self._data[tkey], self._data[("dev", task.name)]

    def _report_notes(self, task: Task, split: str, notes: dict[str, int]) -> None:
        """Counted changes to the data (truncations, skipped rows): logged, and kept for the record."""
        notes = {k: v for k, v in notes.items() if v}
        self.notes.setdefault(task.name, {})[split] = notes
        if notes:
            log(f"{task.name} {split}: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in notes.items())
                + f" (max length {self.cfg.budget.max_length})", self.quiet())

    def start_score(self, task: Task, seed: int, model, tokenizer, scorer) -> dict[str, float]:
        """Dev metrics of the untrained model (base + fresh head): step 0 of every curve."""
        key = ("start", task.name, 0 if task.generative else seed)
        if key not in self._data:
            self._data[key] = score_model(copy.deepcopy(model), scorer, self.acc)
        return self._data[key]

    def cell(self, task: Task, spec: MethodSpec, seed: int, progress=None) -> dict[str, Any]:
        """Train and score one cell; returns its record (status ok)."""
        record, _ = self.train(task, spec, seed, progress)
        self.acc.free_memory()
        return record

    def train(self, task: Task, spec: MethodSpec, seed: int, progress=None, ckpt=None, monitor=None):
        """(record, Built): one training run; the Built holds the trained model or deltas.
        ``ckpt``: a ``checkpoint.Checkpointer`` (checkpoint along the way, resume from it).
        ``monitor``: see ``loop.TrainingRun.run``."""
        set_seed(seed)
        model, tok = self.models.get(task, seed)
        train, scorer = self.data(task, seed, tok, model)
        start = self.start_score(task, seed, model, tok, scorer)
        set_seed(seed)  # deltas initialise from the seed, whatever loading consumed
        built = build(spec, model, self.cfg.budget.steps, self.cfg.lr, self.cfg.head_lr)
        built.tokenizer = tok
        if getattr(train, "packed", False):
            check_packing(built.model, pad_id(tok))
        run = TrainingRun(built.model, built.groups, task, train, scorer, self.cfg.budget, pad_id(tok),
                          self.acc, delta=built.delta, regroup=built.regroup)
        result = run.run(progress=progress, start=start, ckpt=ckpt, monitor=monitor)
        if built.delta is not None:  # a sparse switch changes what is trained and stored
            built.trainable = count_trainable(built.delta)
        result.pop("model")
        eff = {k: result.pop(k) for k in ("train_seconds", "step_time_median", "step_time_mean",
                                          "throughput", "peak_mem_mb", "mem_start_mb", "mem_kind",
                                          "other_cpu", "comm_bytes_per_step")}
        eff.update(trainable=built.trainable, base_params=built.base_params, delta_bytes=delta_bytes(built),
                   trainable_percent=100.0 * built.trainable / max(built.base_params, 1))
        extra = {"data": self.notes.get(task.name, {})} if task.generative else {}
        if getattr(scorer, "last", None) is not None:  # per-example dev predictions of the final model
            extra["dev"] = scorer.last
        if task.generative:
            extra["samples"] = [{"input": i, "output": o, "references": r[:3]} for i, o, r in
                                zip(scorer.dev.inputs[:5], scorer.outputs[:5], scorer.dev.references[:5])]
        return {**result, "efficiency": eff, "configs": built.configs, **extra}, built


def delta_bytes(built) -> int:
    """Bytes of the saved delta (safetensors); for full fine-tuning, of every model tensor."""
    if built.delta is None:
        return sum(p.numel() * p.element_size() for p in built.model.parameters())
    rows = built.delta.summary()
    return sum(r["disk_bytes"] for r in rows)


def run_suite(cfg: SuiteConfig) -> list[dict[str, Any]]:
    """Run every cell not finished yet; write results.jsonl, summary.md and the plots."""
    runner = Runner(cfg)
    quiet = runner.quiet()
    tasks = [parse_task(t) for t in cfg.tasks]
    specs = [parse_method(m) for m in (cfg.methods or default_methods())]
    if cfg.train:  # --report reads results.jsonl only: no data file is opened
        _check_data(tasks, cfg.data_dir, quiet)
    out = Path(cfg.out)
    results = out / report.RESULTS
    done = {k for k, r in report.latest(report.read(results)).items() if r.get("status") == "ok"} if cfg.resume else set()
    # method-major: a suite stopped part-way holds whole rows (every task and seed of the first
    # methods), which a table and the paired statistics can use; a task-major order would not
    cells = [(t, s, seed) for s in specs for t in tasks for seed in cfg.seeds]
    log(f"{len(cells)} runs ({len(specs)} methods x {len(tasks)} tasks x {len(cfg.seeds)} seeds), "
        f"{cfg.budget.steps} steps each, on {runner.acc.device}; results in {out}", quiet)
    keys, t_start = [], time.perf_counter()
    for i, (task, spec, seed) in enumerate(cells, 1):
        key = runner.key(task, spec, seed)
        keys.append(key)
        where = f"[{i}/{len(cells)}] {spec.label} on {task.name} (seed {seed})"
        if key in done:
            log(f"{where}: done already, skipped", quiet)
            continue
        if not cfg.train:  # --report: the summary of what is done, nothing trained
            continue
        rec = _run_cell(runner, task, spec, seed, key, where, quiet)
        if runner.acc.is_main_process:
            report.append(results, rec)
    records = [r for k, r in report.latest(report.read(results)).items() if k in set(keys)]
    if runner.acc.is_main_process:
        write_reports(records, [s.label for s in specs], tasks, out, cfg.plots, planned=len(cells))
        log(f"finished in {time.perf_counter() - t_start:.0f} s: {out / report.SUMMARY}", quiet)
    return records


def _run_cell(runner: Runner, task: Task, spec: MethodSpec, seed: int, key: str, where: str,
              quiet: bool) -> dict[str, Any]:
    from tqdm import tqdm

    base = runner.base_record(task, spec, seed, key)
    t0 = time.perf_counter()
    with tqdm(total=runner.cfg.budget.steps, desc=f"{spec.label} {task.name}", leave=False,
              disable=quiet, file=sys.stderr) as bar:
        try:
            rec = {**base, "status": "ok", **runner.cell(task, spec, seed, progress=bar)}
        except Exception as e:  # one failing method must not stop the suite
            runner.acc.free_memory()
            log(f"{where}: FAILED: {type(e).__name__}: {e}", quiet)
            return {**base, "status": "failed", "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc(limit=6), "seconds": time.perf_counter() - t0}
    rec["seconds"] = time.perf_counter() - t0
    eff = rec["efficiency"]
    log(f"{where}: {task.metric} {100 * rec['metric']:.1f} (best {100 * rec['convergence']['best']:.1f}), "
        f"{eff['trainable']:,} trainable ({eff['trainable_percent']:.3g}%), "
        f"{1000 * eff['step_time_median']:.0f} ms/step, peak {eff['peak_mem_mb']:.0f} MB, "
        f"{rec['seconds']:.1f} s", quiet)
    return rec


def write_reports(records: list[dict[str, Any]], methods: list[str], tasks: list[Task], out: Path,
                  plots: bool = True, planned: int | None = None) -> list[Path]:
    from ..core.state import atomic_write

    pairs = [(t.name, t.metric) for t in tasks]
    text = report.summary_markdown(records, methods, pairs, planned=planned)
    atomic_write(out / report.SUMMARY, text.encode())
    files = [out / report.SUMMARY]
    if plots:
        files += report.plots(records, methods, pairs, out)
    return files


def _check_data(tasks: list[Task], data_dir: str | None, quiet: bool) -> None:
    glue = [t.name for t in tasks if t.extra.get("glue")]
    bad = [f for f, ok in verify_glue(glue, data_dir).items() if not ok] if glue else []
    for t in tasks:
        if "checksums" in t.extra:  # a shipped data set with its own SHA256SUMS (E2E)
            bad += [f"{t.name}/{f}" for f, ok in verify_files(t.extra["checksums"](data_dir)).items() if not ok]
    if bad:
        log(f"WARNING: {', '.join(bad)} differ from SHA256SUMS: results are not comparable to "
            f"runs on the original files.", quiet)
