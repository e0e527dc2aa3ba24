"""The summary's tables that carry intervals: performance (mean and 95% interval), paired
differences to full fine-tuning and to LoRA, and convergence to a fraction of full's score.

Kept apart from `report` (files, plots, the efficiency and generation tables) because every
number here goes through `compare` and `stats`: a cell shows an interval, or says why it has none.
"""
from __future__ import annotations

import numpy as np

from . import compare as C
from .compare import Cells
from .metrics import SHORT
from .stats import Interval, PairingError, t_interval

ONE_CLASS = "†"


def ci(iv: Interval, scale: float = 100.0, signed: bool = False, digits: int = 1) -> str:
    """``75.0 [72.1, 77.9]``; the point alone when there is no interval."""
    if iv.n == 0 or not np.isfinite(iv.mean):
        return "–"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    text = f.format(iv.mean * scale)
    if iv.has_interval:
        text += f" [{f.format(iv.low * scale)}, {f.format(iv.high * scale)}]"
    return text


def _params_pct(p: float) -> str:
    return "100" if p >= 99.995 else (f"{p:.3g}" if p >= 0.001 else f"{p:.2g}")


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _head(cells: list[str]) -> list[str]:
    return [_row(cells), "|" + "---|" * len(cells)]


def performance_table(c: Cells, methods: list[str], tasks: list[tuple[str, str]],
                      failed: set[tuple[str, str]]) -> list[str]:
    names = [t for t, _ in tasks]
    lines = _head(["Method", "Params (%)", *(f"{t} ({SHORT[m]})" for t, m in tasks), "Avg"])
    for method in methods:
        cells, params = [], None
        for task in names:
            rs = c.get((method, task))
            if not rs:
                cells.append("failed" if (method, task) in failed else "–")
                continue
            params = params if params is not None else next(iter(rs.values()))["efficiency"]["trainable_percent"]
            mark = ONE_CLASS if C.single_class(rs) else ""
            cells.append(ci(C.score(c, method, [task])) + mark)
        try:
            avg = ci(C.score(c, method, names))
        except PairingError:
            avg = "–"
        lines.append(_row([f"`{method}`", _params_pct(params) if params is not None else "–", *cells, avg]))
    return lines


def difference_table(c: Cells, methods: list[str], tasks: list[str]) -> tuple[list[str], list[str]]:
    """(table lines, reasons for unpaired cells). Columns: each task (and the average over tasks
    when there are several) minus full, and minus LoRA; bold when the interval excludes 0."""
    refs = [r for r in (C.FULL, C.LORA) if any(m == r for m in methods)]
    if not refs:
        return [], []
    groups = [[t] for t in tasks] + ([list(tasks)] if len(tasks) > 1 else [])
    cols = [(g, r) for g in groups for r in refs]
    lines = _head(["Method", *(f"{g[0] if len(g) == 1 else 'Avg'} − `{r}`" for g, r in cols)])
    reasons: list[str] = []
    for method in methods:
        cells = []
        for g, ref in cols:
            if method == ref:
                cells.append("–")
                continue
            try:
                iv = C.difference(c, method, ref, g)
            except PairingError as e:
                cells.append("unpaired")
                reasons.append(f"`{method}` vs `{ref}`: {e}")
                continue
            text = ci(iv, signed=True)
            cells.append(f"**{text}**" if iv.excludes(0.0) else text)
        lines.append(_row([f"`{method}`", *cells]))
    return lines, list(dict.fromkeys(reasons))


def convergence_table(c: Cells, methods: list[str], tasks: list[str], fraction: float = C.FRACTION) -> list[str]:
    """Per task: the best dev score on the curve, then steps and training seconds to `fraction`
    of full fine-tuning's final score (mean and interval over the seeds that reached it, and
    how many did)."""
    goal = f"{fraction:.0%} of `full`"
    lines = _head(["Method", *(h for t in tasks for h in (f"{t}: best", f"{t}: steps to {goal}",
                                                           f"{t}: seconds to {goal}"))])
    for method in methods:
        cells = []
        for task in tasks:
            rs = c.get((method, task))
            if not rs:
                cells += ["–"] * 3
                continue
            cells.append(ci(t_interval([r["convergence"]["best"] for r in rs.values()])))
            target = C.target(c, task, fraction)
            if target is None:
                cells += ["no `full` run"] * 2
                continue
            hits = [h for h in (C.reach(r, target) for r in rs.values()) if h is not None]
            if not hits:
                cells += [f"never (0/{len(rs)})"] * 2
                continue
            reached = f" ({len(hits)}/{len(rs)})" if len(hits) < len(rs) else ""
            cells.append(ci(t_interval([h[0] for h in hits]), scale=1, digits=0) + reached)
            cells.append(ci(t_interval([h[1] for h in hits]), scale=1) + reached)
        lines.append(_row([f"`{method}`", *cells]))
    return lines
