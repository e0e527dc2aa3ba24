import math

import numpy as np
import pytest

from deltatune.bench import metrics as M
from deltatune.bench.loop import convergence
from deltatune.bench.tasks import get_task


def test_metric_values_by_hand():
    pred, gold = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1])
    assert M.accuracy(pred, gold) == pytest.approx(3 / 5)
    # tp 2, fp 1, fn 1: precision 2/3, recall 2/3
    assert M.f1(pred, gold) == pytest.approx(2 / 3)
    # MCC = (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (2*1 - 1*1) / sqrt(3*3*2*2)
    assert M.mcc(pred, gold) == pytest.approx(1 / 6)
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 4.0])
    assert M.pearson(x, y) == pytest.approx(0.8)
    assert M.spearman(x, y) == pytest.approx(0.8)
    assert M.pearson(x, x ** 3) < 1.0 and M.spearman(x, x ** 3) == pytest.approx(1.0)


def test_degenerate_inputs_stay_finite():
    const, gold = np.zeros(4), np.array([0.0, 1.0, 2.0, 3.0])
    assert M.pearson(const, gold) == 0.0 and M.spearman(const, gold) == 0.0
    assert M.mcc(np.zeros(4, int), np.array([0, 1, 0, 1])) == 0.0
    assert M.f1(np.zeros(4, int), np.array([0, 1, 0, 1])) == 0.0


def test_score_uses_argmax_or_the_single_output():
    sst = get_task("SST-2")
    logits = np.array([[0.2, 0.9], [1.0, -1.0], [0.0, 0.1]])
    assert M.score(sst, logits, [1, 0, 0]) == {"accuracy": pytest.approx(2 / 3)}
    stsb = get_task("STS-B")
    out = M.score(stsb, np.array([[0.1], [0.4], [0.3]]), [1.0, 4.0, 3.0])
    assert out["pearson"] == pytest.approx(np.corrcoef([0.1, 0.4, 0.3], [1, 4, 3])[0, 1])
    assert out["spearman"] == pytest.approx(1.0)
    assert set(M.score(get_task("MRPC"), logits, [1, 0, 1])) == {"f1", "accuracy"}
    assert set(M.score(get_task("CoLA"), logits, [1, 0, 1])) == {"mcc", "accuracy"}


def test_convergence_counts_90_percent_of_the_gain():
    curve = [{"step": s, "seconds": s / 10, "metric": m} for s, m in [(0, 0.5), (10, 0.6), (20, 0.9), (30, 0.8)]]
    c = convergence(curve)
    assert c["best"] == 0.9 and c["best_step"] == 20 and c["start"] == 0.5
    assert c["steps_to_90"] == 20 and c["seconds_to_90"] == 2.0  # goal 0.5 + 0.9 * 0.4 = 0.86
    curve[1]["metric"] = 0.87
    assert convergence(curve)["steps_to_90"] == 10
    flat = [{"step": s, "seconds": 0.0, "metric": 0.5} for s in (0, 10)]
    c = convergence(flat)
    assert c["steps_to_90"] is None and c["seconds_to_90"] is None and not math.isnan(c["best"])
