"""Task metrics (scikit-learn / scipy), on the 0-1 (or -1..1) scale; reports show them x100.

Degenerate inputs give defined numbers instead of NaN, so that tables and plots stay finite:
a correlation with a constant prediction is 0 (no linear relation), as sklearn does for MCC.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from .tasks import Task


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(gold, pred))


def f1(pred: np.ndarray, gold: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(gold, pred, average="binary", pos_label=1, zero_division=0))


def mcc(pred: np.ndarray, gold: np.ndarray) -> float:
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(gold, pred))


def _corr(fn: Callable, pred: np.ndarray, gold: np.ndarray) -> float:
    if len(pred) < 2 or np.ptp(pred) == 0 or np.ptp(gold) == 0:
        return 0.0
    value = float(fn(pred, gold)[0])
    return value if math.isfinite(value) else 0.0


def pearson(pred: np.ndarray, gold: np.ndarray) -> float:
    from scipy.stats import pearsonr

    return _corr(pearsonr, pred, gold)


def spearman(pred: np.ndarray, gold: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return _corr(spearmanr, pred, gold)


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy, "f1": f1, "mcc": mcc, "pearson": pearson, "spearman": spearman,
}

SHORT = {"accuracy": "acc", "f1": "F1", "mcc": "MCC", "pearson": "Pearson", "spearman": "Spearman",
         "bleu": "BLEU", "rougeL": "ROUGE-L", "exact_match": "EM", "loss": "loss", "perplexity": "ppl"}
# shown as they are (not x100), and lower is better
UNSCALED = ("loss", "perplexity")


def predictions(task: Task, logits: np.ndarray) -> np.ndarray:
    """Class ids (argmax) or, for regression, the single output."""
    return logits.reshape(-1) if task.regression else logits.argmax(-1)


def score(task: Task, logits: np.ndarray, labels: Sequence) -> dict[str, float]:
    """Every metric of the task from raw logits and gold labels."""
    pred = predictions(task, np.asarray(logits, dtype=np.float64))
    gold = np.asarray(labels, dtype=np.float64 if task.regression else np.int64)
    if len(gold) == 0:
        raise ValueError(f"task {task.name}: no examples to score")
    return {m: METRICS[m](pred, gold) for m in task.metrics}


def format_scores(metrics: dict[str, float]) -> str:
    """``bleu 41.20, ..., loss 1.234`` (scores x100, losses as they are)."""
    return ", ".join(f"{k} {v:.3f}" if k in UNSCALED else f"{k} {100 * v:.2f}" for k, v in metrics.items())
