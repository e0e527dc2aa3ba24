"""Confidence intervals for the bench's summaries, all computed by ``scipy.stats``.

Why these three: a run's dev score varies with the seed (head init, data order, delta init) and
with which dev examples happen to be in the subset. With several seeds the interval is Student's t
over the seeds' scores (``ttest_1samp(...).confidence_interval``); with one seed the only spread
left to measure is the examples', so it is a bootstrap over the dev examples (``bootstrap``,
resampling (prediction, gold) pairs and recomputing the task metric, which also covers MCC, F1 and
Pearson that are not means of per-example scores). A difference between two methods is paired:
per seed (the same seed gives both methods the same data order and head) or per example (the same
dev examples), which removes the variance the two runs share; two result sets that were not run on
the same seeds or examples are refused (`PairingError`) rather than compared as if they were.

Percentile bootstrap, not BCa: a run still predicting the majority class gives a constant
statistic on every resample, where BCa's acceleration is undefined; the percentile interval is
then the point itself, which is what such a run deserves.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # the same resamples every time: a summary is reproducible from results.jsonl


class PairingError(ValueError):
    """Two sets of results cannot be paired (different seeds or different dev examples)."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with its two-sided interval; ``how`` says where the interval came from:
    ``t`` (over n seeds), ``bootstrap`` (over n dev examples, one seed) or ``none`` (n = 1, no
    per-example scores: no interval)."""

    mean: float
    low: float
    high: float
    n: int
    how: str

    @property
    def has_interval(self) -> bool:
        return self.how != "none"

    def excludes(self, value: float = 0.0) -> int:
        """+1 when the whole interval is above `value`, -1 when below, 0 when it contains it
        (or there is no interval)."""
        if not self.has_interval:
            return 0
        return 1 if self.low > value else -1 if self.high < value else 0

    def overlaps(self, other: Interval) -> bool:
        return not (self.low > other.high or other.low > self.high)

    def scaled(self, k: float) -> Interval:
        lo, hi = sorted((self.low * k, self.high * k))
        return Interval(self.mean * k, lo, hi, self.n, self.how)


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean and Student-t interval of `values` (seeds); a single value has no interval, equal
    values a zero-width one (scipy would warn and return a rounding-error width)."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "none")
    mean = float(x.mean())
    if x.size == 1:
        return Interval(mean, mean, mean, 1, "none")
    if np.ptp(x) == 0:
        return Interval(mean, mean, mean, int(x.size), "t")
    ci = stats.ttest_1samp(x, 0.0).confidence_interval(confidence)
    return Interval(mean, float(ci.low), float(ci.high), int(x.size), "t")


Metric = Callable[[np.ndarray, np.ndarray], float]


def bootstrap_metric(pred: Sequence[float], gold: Sequence[float], metric: Metric,
                     confidence: float = CONFIDENCE, resamples: int = RESAMPLES) -> Interval:
    """`metric(pred, gold)` with a paired percentile bootstrap over the examples."""
    p, g = np.asarray(pred), np.asarray(gold)
    point = float(metric(p, g))
    ci = _bootstrap((p, g), lambda a, b: metric(a, b), confidence, resamples)
    return Interval(point, *ci, int(p.size), "bootstrap")


def paired_bootstrap(pred_a: Sequence[float], pred_b: Sequence[float], gold: Sequence[float], metric: Metric,
                     confidence: float = CONFIDENCE, resamples: int = RESAMPLES) -> Interval:
    """``metric(a) - metric(b)`` on the same examples, resampling examples (the same ones for both)."""
    a, b, g = np.asarray(pred_a), np.asarray(pred_b), np.asarray(gold)
    if not a.size == b.size == g.size:
        raise PairingError(f"{a.size} and {b.size} predictions for {g.size} examples")
    point = float(metric(a, g) - metric(b, g))
    ci = _bootstrap((a, b, g), lambda x, y, z: metric(x, z) - metric(y, z), confidence, resamples)
    return Interval(point, *ci, int(g.size), "bootstrap")


def bootstrap_groups(groups: Sequence[tuple[np.ndarray, ...]], statistic: Callable[[list[tuple[np.ndarray, ...]]], float],
                     confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                     vectorized: bool = False) -> Interval:
    """`statistic` over several groups of examples (one per task: its arrays of predictions and
    gold, row-aligned), each group's examples resampled on their own (tasks are independent
    samples; within a task the arrays move together). The point is the statistic on the data.
    ``vectorized``: `statistic` takes arrays with the resamples along the first axes and the
    examples along the last (e.g. accuracy as ``(pred == gold).mean(-1)``): one call for all
    resamples instead of thousands (scipy's ``vectorized``)."""
    groups = [tuple(np.asarray(a) for a in g) for g in groups]
    for g in groups:
        if len({a.shape[0] for a in g}) != 1:
            raise PairingError(f"arrays of one group differ in length: {[a.shape[0] for a in g]}")
    point = float(statistic(groups))

    def on_indices(*idx: np.ndarray, axis: int = -1) -> float:  # scipy passes axis when vectorized
        return statistic([tuple(a[i] for a in g) for g, i in zip(groups, idx)])

    data = tuple(np.arange(g[0].shape[0]) for g in groups)
    ci = _bootstrap(data, on_indices, confidence, resamples, paired=len(groups) == 1, vectorized=vectorized)
    return Interval(point, *ci, int(sum(g[0].shape[0] for g in groups)), "bootstrap")


def paired_t(a: dict[int, float], b: dict[int, float], confidence: float = CONFIDENCE) -> Interval:
    """Mean and t interval of ``a[seed] - b[seed]``; the two must hold the same seeds."""
    if set(a) != set(b):
        raise PairingError(f"seeds differ: {sorted(a)} vs {sorted(b)}")
    seeds = sorted(a)
    return t_interval([a[s] - b[s] for s in seeds], confidence)


def _bootstrap(data: tuple[np.ndarray, ...], statistic, confidence: float, resamples: int,
               paired: bool = True, vectorized: bool = False) -> tuple[float, float]:
    from scipy import stats

    res = stats.bootstrap(data, statistic, paired=paired, vectorized=vectorized, n_resamples=resamples,
                          confidence_level=confidence, method="percentile",
                          rng=np.random.default_rng(BOOTSTRAP_SEED))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)
