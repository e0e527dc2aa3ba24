"""Results: one JSON line per run, a Markdown summary in the papers' layout, and PNG plots.

Layout of an output directory:
    results.jsonl    one line per run (config, environment, metrics, curves); appended as runs end
    summary.md       performance (methods x tasks, average, params %) with 95% intervals, paired
                     differences to full fine-tuning and LoRA, efficiency, convergence, findings
    curves.png       dev metric vs step with 95% bands over seeds, one panel per task
    tradeoff.png     average metric vs trainable-parameter fraction
    efficiency.png   step time and peak memory per method
Metrics are stored on their 0-1 scale and shown x100. Intervals: t over seeds, or with one seed a
bootstrap over dev examples (`stats`, `compare`, `tables`).
"""
from __future__ import annotations

import json
import math
import os
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import compare, findings, tables
from .metrics import SHORT, UNSCALED

RESULTS = "results.jsonl"
SUMMARY = "summary.md"


# -- JSON lines -----------------------------------------------------------------------------------
def append(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with open(path, "a", encoding="utf-8") as f:
        # a line cut short by an interruption stays alone on its line (and is skipped by read)
        f.write(("\n" if torn else "") + json.dumps(record, sort_keys=True, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read(path: Path) -> list[dict[str, Any]]:
    """Every complete line; a line cut short by an interruption is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "key" in rec:
            out.append(rec)
    return out


def latest(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last record of each cell key."""
    return {r["key"]: r for r in records}


# -- aggregation ----------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float | None]:
    if not values:
        return math.nan, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def grouped(records: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Successful runs by (method label, task)."""
    out: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r.get("status") == "ok":
            out[(r["method"], r["task"])].append(r)
    return out


def _pct(v: float | None, std: float | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{100 * v:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _avg(rs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r["efficiency"][key] for r in rs if r["efficiency"].get(key) is not None]
    return statistics.fmean(vals) if vals else None


# -- the Markdown summary -------------------------------------------------------------------------
SHARED, BUSY_CORES = "‡", 0.25  # a run during which other processes kept a quarter core busy or more


def _shared(r: dict[str, Any]) -> bool:
    return r["efficiency"].get("other_cpu", 0.0) >= BUSY_CORES


def efficiency_table(methods: list[str], groups) -> list[str]:
    head = ["Method", "Trainable params", "Step time (ms)", "Throughput (ex/s)", "Peak memory (MB)",
            "Memory over start (MB)", "Delta on disk"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        rs = [r for (m, _), v in groups.items() if m == method for r in v]
        if not rs:
            continue
        eff = rs[0]["efficiency"]
        step, thr, peak = _avg(rs, "step_time_median"), _avg(rs, "throughput"), _avg(rs, "peak_mem_mb")
        over = statistics.fmean([r["efficiency"]["peak_mem_mb"] - r["efficiency"]["mem_start_mb"] for r in rs])
        shared = SHARED if any(map(_shared, rs)) else ""
        lines.append(f"| `{method}` | {eff['trainable']:,} | {1000 * step:.0f}{shared} | {thr:.1f} | {peak:.0f} | "
                     f"{over:.0f} | {_size(eff['delta_bytes'])} |")
    return lines


def generative_tasks(records: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["task"] for r in records if r.get("kind") in ("causal_lm", "seq2seq")))


GEN_COLUMNS = ("bleu", "rougeL", "exact_match", "loss", "perplexity")


def generation_table(methods: list[str], task: str, groups) -> list[str]:
    """Every generation metric of the last evaluation, and step 0's (the untrained model)."""
    head = ["Method", *(SHORT[c] for c in GEN_COLUMNS), "untrained BLEU / loss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        rs = groups.get((method, task), [])
        if not rs:
            continue
        cells = []
        for c in GEN_COLUMNS:
            mean, std = _mean_std([r["metrics"][c] for r in rs])
            cells.append(f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else "") if c in UNSCALED
                         else _pct(mean, std))
        start = rs[0]["curve"][0]["metrics"]
        lines.append(f"| `{method}` | " + " | ".join(cells) + f" | {_pct(start['bleu'])} / {start['loss']:.3f} |")
    return lines


def summary_markdown(records: list[dict[str, Any]], methods: list[str], tasks: list[tuple[str, str]],
                     title: str = "deltatune bench", planned: int | None = None) -> str:
    """``planned``: the suite's number of runs; fewer finished makes the summary say it is partial."""
    groups = grouped(records)
    done = {(r["method"], r["task"], r["seed"]) for r in records if r.get("status") == "ok"}
    failed = {(r["method"], r["task"], r["seed"]): r.get("error", "") for r in records
              if r.get("status") != "ok" and (r["method"], r["task"], r["seed"]) not in done}
    ok = [r for r in records if r.get("status") == "ok"]
    lines = [f"# {title}", ""]
    if planned is not None and len(done) < planned:
        lines += [f"**Partial: {len(done)} of {planned} planned runs finished** (a cell with no runs shows "
                  f"–; the intervals and findings cover the finished runs only). The same command resumes "
                  f"the suite.", ""]
    if ok:
        r0 = ok[0]
        b = r0["budget"]
        seeds = sorted({r["seed"] for r in ok})
        lines += [
            f"Model `{r0['model']}`; seeds {seeds}; per run {b['steps']} steps x batch {b['batch_size']} "
            f"(train subsampled to {b['steps'] * b['batch_size']} examples), max length {b['max_length']}, "
            f"dev subset {b['dev_size'] or 'all'} (scored every {b['eval_every']} steps).",
            f"Machine: {_machine(r0)}.", "",
        ]
    c, names = compare.cells(records), [t for t, _ in tasks]
    lines += ["## Performance (dev, x100; mean [95% interval])", ""]
    lines += tables.performance_table(c, methods, tasks, {(m, t) for m, t, _ in failed})
    lines += ["", _interval_note(ok)]
    diff, unpaired = tables.difference_table(c, methods, names)
    if diff:
        lines += ["", "## Paired differences (dev, x100; bold: the 95% interval excludes 0)", ""] + diff
        lines += [""] + [f"- unpaired: {r}" for r in unpaired] if unpaired else []
    lines += ["", "## Efficiency (mean over tasks and seeds)", ""] + efficiency_table(methods, groups)
    lines += ["", "Peak memory: " + _mem_note(ok) + _shared_note(ok), ""]
    lines += [f"## Convergence (best dev score; steps and training seconds to {compare.FRACTION:.0%} of "
              f"full fine-tuning's final score, over the seeds that reached it)", ""]
    lines += tables.convergence_table(c, methods, names)
    if ok:
        lines += ["", "## Findings", ""]
        lines += findings.markdown(findings.findings(c, methods, names, ok[0]["budget"]["eval_every"]))
    for task in generative_tasks(ok):
        lines += ["", f"## Generation: {task} (dev; scores x100, loss per completion token)", ""]
        lines += generation_table(methods, task, groups)
    if failed:
        lines += ["", "## Runs that failed (retried when the suite runs again)", ""]
        lines += [f"- `{m}` on {t}, seed {s}: {err}" for (m, t, s), err in failed.items()]
    return "\n".join(lines) + "\n"


def _interval_note(ok: list[dict[str, Any]]) -> str:
    seeds = len({r["seed"] for r in ok})
    how = (f"Student t over the {seeds} seeds" if seeds > 1 else
           "one seed: a percentile bootstrap over the dev examples (the seed's spread is not in it)")
    hours = sum(r.get("seconds", 0.0) for r in ok) / 60
    return (f"Intervals: 95%, {how}. {tables.ONE_CLASS}: at least one seed's final model predicts one "
            f"class for every dev example (it has not left the majority class). The runs took "
            f"{hours:.1f} min in all (training and scoring, models loaded once).")


def _machine(r: dict[str, Any]) -> str:
    from .measure import machine_line

    return machine_line(r.get("environment", {}))


def _shared_note(ok: list[dict[str, Any]]) -> str:
    busy = [r for r in ok if _shared(r)]
    if not busy:
        return ""
    worst = max(r["efficiency"]["other_cpu"] for r in busy)
    return (f" {SHARED}: step time measured while other processes kept {BUSY_CORES}+ CPU cores busy "
            f"({len(busy)} of {len(ok)} runs, up to {worst:.1f} cores): slower than on a quiet machine, "
            f"compare with care.")


def _mem_note(ok: list[dict[str, Any]]) -> str:
    kinds = {r["efficiency"]["mem_kind"] for r in ok}
    if kinds == {"cuda_allocated"}:
        return "the CUDA allocator's peak during training; over start: the peak minus the allocation before the first step."
    return ("the process's peak resident set size (RSS) during training, all runs in one process; over start: "
            "that peak minus the RSS before the first step (activations, gradients, optimizer state).")


# -- plots ----------------------------------------------------------------------------------------
def plots(records: list[dict[str, Any]], methods: list[str], tasks: list[tuple[str, str]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    groups = grouped(records)
    if not groups:
        return []
    files = [_curves(groups, methods, tasks, out / "curves.png"),
             _tradeoff(groups, methods, tasks, out / "tradeoff.png"),
             _efficiency(groups, methods, out / "efficiency.png")]
    gen = generative_tasks([r for rs in groups.values() for r in rs])
    if gen:
        files.append(_loss_curves(groups, methods, gen, out / "loss_curves.png"))
    return [f for f in files if f is not None]


def _curves(groups, methods, tasks, path: Path) -> Path:
    """Mean dev metric per evaluation with its 95% t band over seeds (none with one seed), and
    the convergence target (a fraction of full fine-tuning's final score) dashed."""
    import matplotlib.pyplot as plt

    from .stats import t_interval

    c = compare.cells(r for rs in groups.values() for r in rs)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, (task, metric) in zip(axes[0], tasks):
        for method in methods:
            rs = groups.get((method, task))
            if not rs:
                continue
            n = min(len(r["curve"]) for r in rs)
            steps = [rs[0]["curve"][i]["step"] for i in range(n)]
            ivs = [t_interval([r["curve"][i]["metric"] for r in rs]).scaled(100) for i in range(n)]
            line, = ax.plot(steps, [iv.mean for iv in ivs], marker="o", ms=3, label=method)
            if all(iv.has_interval for iv in ivs):
                ax.fill_between(steps, [iv.low for iv in ivs], [iv.high for iv in ivs],
                                color=line.get_color(), alpha=0.15, lw=0)
        target = compare.target(c, task)
        if target is not None:
            ax.axhline(100 * target, color="grey", ls="--", lw=0.8,
                       label=f"{compare.FRACTION:.0%} of full's final")
        ax.set(title=task, xlabel="training step", ylabel=f"dev {SHORT[metric]} (x100)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(fig, path)


def _loss_curves(groups, methods, tasks: list[str], path: Path) -> Path:
    """Generation tasks: the training loss per step and the dev loss at each evaluation."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 4.0 * len(tasks)), squeeze=False)
    for (ax_train, ax_dev), task in zip(axes, tasks):
        for method in methods:
            rs = groups.get((method, task))
            if not rs:
                continue
            n = min(len(r["loss"]) for r in rs)
            ax_train.plot(range(1, n + 1), [statistics.fmean(r["loss"][i] for r in rs) for i in range(n)],
                          lw=1, label=method)
            steps = [c["step"] for c in rs[0]["curve"]]
            ax_dev.plot(steps, [statistics.fmean(r["curve"][i]["metrics"]["loss"] for r in rs)
                                for i in range(len(steps))], marker="o", ms=3, label=method)
        ax_train.set(title=f"{task}: training loss", xlabel="training step", ylabel="loss")
        ax_dev.set(title=f"{task}: dev loss per completion token", xlabel="training step", ylabel="loss")
        for ax in (ax_train, ax_dev):
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(fig, path)


def _tradeoff(groups, methods, tasks, path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    points = 0
    for method in methods:
        rs = [groups.get((method, t)) for t, _ in tasks]
        if not all(rs):
            continue
        avg = 100 * statistics.fmean(statistics.fmean(r["metric"] for r in g) for g in rs)
        pct = max(rs[0][0]["efficiency"]["trainable_percent"], 1e-4)
        ax.scatter([pct], [avg])
        ax.annotate(method, (pct, avg), fontsize=7, xytext=(3, 3), textcoords="offset points")
        points += 1
    ax.set(xscale="log", xlabel="trainable parameters (% of the base, log scale)",
           ylabel="average dev metric (x100)", title="performance vs trainable parameters")
    ax.grid(alpha=0.3)
    return _save(fig, path) if points else _discard(fig)


def _efficiency(groups, methods, path: Path) -> Path:
    """Step time, and memory: on CPU the growth of RSS during training (the process's baseline of
    libraries and loaded models is the same for every method), on CUDA the allocator's peak."""
    import matplotlib.pyplot as plt

    rows = [(m, [r for (mm, _), v in groups.items() if mm == m for r in v]) for m in methods]
    rows = [(m, rs) for m, rs in rows if rs]
    names = [m for m, _ in rows]
    step = [1000 * _avg(rs, "step_time_median") for _, rs in rows]
    cuda = all(r["efficiency"]["mem_kind"] == "cuda_allocated" for _, rs in rows for r in rs)
    mem = [_avg(rs, "peak_mem_mb") if cuda else
           statistics.fmean(r["efficiency"]["peak_mem_mb"] - r["efficiency"]["mem_start_mb"] for r in rs)
           for _, rs in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.35 * len(names) + 1.6))
    axes[0].barh(names, step)
    axes[0].set(xlabel="median step time (ms)", title="step time")
    axes[1].barh(names, mem)
    axes[1].set(xlabel="peak allocated (MB)" if cuda else "peak RSS minus RSS before training (MB)",
                title="peak memory (CUDA)" if cuda else "training memory (CPU)")
    for ax in axes:
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _discard(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)
