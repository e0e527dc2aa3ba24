"""From results.jsonl records to the numbers a reader compares: per method and task the score
with its interval, paired differences between methods, steps to a fraction of full fine-tuning's
score, and per-step cost relative to full fine-tuning.

Everything here pairs by seed (several seeds) or by dev example (one seed), and refuses
(`stats.PairingError`) two result sets that do not share their seeds or dev examples: an
unpaired comparison would count the runs' shared variance as a difference. Scores are on the
metric's 0-1 scale; the reports scale them.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np

from . import stats
from .metrics import METRICS
from .stats import Interval, PairingError

Record = dict[str, Any]
Cells = dict[tuple[str, str], dict[int, Record]]  # (method, task) -> seed -> record

FULL = "full"
LORA = "lora"
FRACTION = 0.9  # convergence: steps to this fraction of full fine-tuning's final score


def cells(records: Iterable[Record]) -> Cells:
    """Successful runs by (method label, task) and seed (a later record of a seed wins)."""
    out: Cells = defaultdict(dict)
    for r in records:
        if r.get("status") == "ok":
            out[(r["method"], r["task"])][r["seed"]] = r
    return dict(out)


def _runs(c: Cells, method: str, tasks: list[str]) -> dict[str, dict[int, Record]]:
    missing = [t for t in tasks if not c.get((method, t))]
    if missing:
        raise PairingError(f"`{method}` has no finished run on {', '.join(missing)}")
    return {t: c[(method, t)] for t in tasks}


def _seeds(runs: dict[str, dict[int, Record]], method: str) -> list[int]:
    sets = {t: sorted(rs) for t, rs in runs.items()}
    first = next(iter(sets.values()))
    if any(s != first for s in sets.values()):
        raise PairingError(f"`{method}` ran different seeds on different tasks: {sets}")
    return first


# -- task metrics on stacked resamples ------------------------------------------------------------
# The bootstrap resamples a dev set thousands of times; sklearn's metrics take about a millisecond
# per call, which made a one-seed summary take minutes. These compute the same numbers as
# `metrics` (tested) on arrays whose last axis is the examples and whose leading axes are the
# resamples, in one call (stats.bootstrap_groups(vectorized=True)), with `metrics`' conventions
# for degenerate inputs (0 where sklearn / `metrics` give 0).
def _binary_counts(pred: np.ndarray, gold: np.ndarray) -> tuple[np.ndarray, ...]:
    p, g = pred == 1, gold == 1
    return ((p & g).sum(-1), (~p & ~g).sum(-1), (p & ~g).sum(-1), (~p & g).sum(-1))


def _mcc(pred: np.ndarray, gold: np.ndarray) -> np.ndarray:
    tp, tn, fp, fn = (x.astype(np.float64) for x in _binary_counts(pred, gold))
    den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return np.divide(tp * tn - fp * fn, den, out=np.zeros_like(den), where=den > 0)


def _f1(pred: np.ndarray, gold: np.ndarray) -> np.ndarray:
    tp, _, fp, fn = (x.astype(np.float64) for x in _binary_counts(pred, gold))
    den = 2 * tp + fp + fn
    return np.divide(2 * tp, den, out=np.zeros_like(den), where=den > 0)


def _pearson(pred: np.ndarray, gold: np.ndarray) -> np.ndarray:
    import warnings

    from scipy.stats import pearsonr

    flat = (np.ptp(pred, axis=-1) == 0) | (np.ptp(gold, axis=-1) == 0)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # a constant resample: scipy warns and gives NaN; metrics says 0
        r = np.asarray(pearsonr(pred, gold, axis=-1).statistic)
    return np.where(flat | ~np.isfinite(r), 0.0, r)


VECTORIZED = {"accuracy": lambda pred, gold: np.mean(pred == gold, axis=-1), "mcc": _mcc, "f1": _f1,
              "pearson": _pearson}


def _vectorizable(rec: Record) -> bool:
    """Binary counts hold for two classes only; other label sets use `metrics` per resample."""
    name = rec["metric_name"]
    if name not in VECTORIZED:
        return False
    return name in ("accuracy", "pearson") or set(rec["dev"]["gold"]) | set(rec["dev"]["pred"]) <= {0, 1}


def _metric(rec: Record):
    return VECTORIZED[rec["metric_name"]] if _vectorizable(rec) else METRICS.get(rec["metric_name"])


def _vectorized(recs: Iterable[Record]) -> bool:
    return all(_vectorizable(r) for r in recs)


def _examples(rec: Record) -> tuple[np.ndarray, np.ndarray] | None:
    dev = rec.get("dev")
    if not dev or _metric(rec) is None:
        return None
    return np.asarray(dev["pred"]), np.asarray(dev["gold"])


def same_examples(a: Record, b: Record) -> None:
    """Raise unless `a` and `b` were scored on the same dev examples."""
    da, db = a.get("dev"), b.get("dev")
    if da and db:
        if da["ids"] != db["ids"] or da["gold"] != db["gold"]:
            raise PairingError(f"`{a['method']}` and `{b['method']}` on {a['task']} were scored on "
                               f"different dev examples")
    elif a.get("budget", {}).get("dev_size") != b.get("budget", {}).get("dev_size"):
        raise PairingError(f"`{a['method']}` and `{b['method']}` on {a['task']} used different dev subsets")


def score(c: Cells, method: str, tasks: list[str]) -> Interval:
    """The method's score averaged over `tasks`: t over seeds, or with one seed a bootstrap over
    each task's dev examples (resampled independently per task)."""
    runs = _runs(c, method, tasks)
    seeds = _seeds(runs, method)
    if len(seeds) > 1:
        return stats.t_interval([_avg(runs, tasks, s) for s in seeds])
    recs = [runs[t][seeds[0]] for t in tasks]
    groups = [_examples(r) for r in recs]
    if any(g is None for g in groups):
        return Interval(_avg(runs, tasks, seeds[0]), math.nan, math.nan, 1, "none")
    fns = [_metric(r) for r in recs]
    return stats.bootstrap_groups(groups, lambda gs: np.mean([f(p, g) for f, (p, g) in zip(fns, gs)], axis=0),
                                  vectorized=_vectorized(recs))


def difference(c: Cells, a: str, b: str, tasks: list[str]) -> Interval:
    """Paired ``score(a) - score(b)`` over `tasks` (same seeds; same dev examples per task)."""
    ra, rb = _runs(c, a, tasks), _runs(c, b, tasks)
    sa, sb = _seeds(ra, a), _seeds(rb, b)
    if sa != sb:
        raise PairingError(f"`{a}` ran seeds {sa}, `{b}` seeds {sb}")
    for t in tasks:
        for s in sa:
            same_examples(ra[t][s], rb[t][s])
    if len(sa) > 1:
        return stats.paired_t({s: _avg(ra, tasks, s) for s in sa}, {s: _avg(rb, tasks, s) for s in sa})
    pairs = [(_examples(ra[t][sa[0]]), _examples(rb[t][sa[0]])) for t in tasks]
    if any(x is None or y is None for x, y in pairs):
        raise PairingError("one seed and no per-example dev predictions: no paired interval")
    groups = [(x[0], y[0], x[1]) for x, y in pairs]
    fns = [_metric(ra[t][sa[0]]) for t in tasks]
    return stats.bootstrap_groups(groups, lambda gs: np.mean(
        [f(pa, g) - f(pb, g) for f, (pa, pb, g) in zip(fns, gs)], axis=0),
        vectorized=_vectorized(ra[t][sa[0]] for t in tasks))


def _avg(runs: dict[str, dict[int, Record]], tasks: list[str], seed: int) -> float:
    return float(np.mean([runs[t][seed]["metric"] for t in tasks]))


def single_class(rs: dict[int, Record]) -> int:
    """How many of the seeds' final models predict one class for every dev example (a
    classifier that has not left the majority class, or sits on the minority one)."""
    return sum(1 for r in rs.values() if r.get("dev") and r["metric_name"] != "pearson"
               and r.get("dev", {}).get("pred") and len(set(r["dev"]["pred"])) == 1)


# -- convergence ----------------------------------------------------------------------------------
def target(c: Cells, task: str, fraction: float = FRACTION) -> float | None:
    """`fraction` of full fine-tuning's final dev score on `task` (mean over its seeds)."""
    rs = c.get((FULL, task))
    if not rs:
        return None
    return fraction * float(np.mean([r["metric"] for r in rs.values()]))


def reach(rec: Record, goal: float) -> tuple[int, float] | None:
    """(step, training seconds) of the first dev evaluation at or above `goal`; None: never."""
    hit = next((p for p in rec["curve"] if p["metric"] >= goal), None)
    return None if hit is None else (hit["step"], hit["seconds"])


def censored_steps(rec: Record, goal: float) -> tuple[float, bool]:
    """Steps to `goal`, and whether the run never reached it; a run that never did counts as one
    evaluation past its last step (a lower bound of its true value), so that it ranks behind every
    run that did without inventing how far behind."""
    hit = reach(rec, goal)
    if hit is not None:
        return float(hit[0]), False
    return float(rec["budget"]["steps"] + rec["budget"]["eval_every"]), True


def steps_to(c: Cells, method: str, tasks: list[str], fraction: float = FRACTION) -> dict[int, tuple[float, int]]:
    """Per seed: steps to `fraction` of full's score, averaged over tasks, and how many tasks
    never reached it."""
    runs = _runs(c, method, tasks)
    out = {}
    for s in _seeds(runs, method):
        vals = []
        for t in tasks:
            goal = target(c, t, fraction)
            if goal is None:
                raise PairingError(f"no full fine-tuning run on {t}: no convergence target")
            vals.append(censored_steps(runs[t][s], goal))
        out[s] = (float(np.mean([v for v, _ in vals])), sum(n for _, n in vals))
    return out


# -- cost relative to full fine-tuning ------------------------------------------------------------
def memory_mb(rec: Record) -> float:
    """Training memory: on CUDA the allocator's peak; on CPU the RSS growth during training (all
    runs share one process, whose baseline is the same for every method)."""
    e = rec["efficiency"]
    return e["peak_mem_mb"] if e["mem_kind"] == "cuda_allocated" else e["peak_mem_mb"] - e["mem_start_mb"]


COSTS = {"step time": lambda r: r["efficiency"]["step_time_median"], "memory": memory_mb}


def cost_ratio(c: Cells, method: str, tasks: list[str], cost: str) -> Interval:
    """The method's cost over full fine-tuning's (same task and seed), averaged over tasks,
    t over seeds; below 1 is a saving."""
    ra, rf = _runs(c, method, tasks), _runs(c, FULL, tasks)
    sa, sf = _seeds(ra, method), _seeds(rf, FULL)
    if sa != sf:
        raise PairingError(f"`{method}` ran seeds {sa}, `full` seeds {sf}")
    fn = COSTS[cost]
    ratios = [float(np.mean([fn(ra[t][s]) / max(fn(rf[t][s]), 1e-9) for t in tasks])) for s in sa]
    return stats.t_interval(ratios)
