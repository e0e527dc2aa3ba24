"""The summary's statistics: intervals equal scipy.stats on fixed inputs, and paired comparisons
pair by seed and by dev example, refusing result sets that do not share them."""
import numpy as np
import pytest
from scipy import stats as st

from deltatune.bench import compare as C
from deltatune.bench import stats
from deltatune.bench.metrics import accuracy, mcc
from deltatune.bench.stats import PairingError
from synthetic_results import GOLD, PRED_A, PRED_B, record


def scipy_bootstrap(data, statistic, vectorized=False, resamples=stats.RESAMPLES):
    res = st.bootstrap(data, statistic, paired=True, vectorized=vectorized, n_resamples=resamples,
                       confidence_level=0.95, method="percentile", rng=np.random.default_rng(stats.BOOTSTRAP_SEED))
    return res.confidence_interval.low, res.confidence_interval.high


def test_t_interval_equals_scipy():
    x = [0.81, 0.84, 0.79, 0.86]
    iv = stats.t_interval(x)
    lo, hi = st.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=st.sem(x))
    assert iv.mean == pytest.approx(np.mean(x)) and (iv.low, iv.high) == pytest.approx((lo, hi), rel=1e-12)
    assert iv.how == "t" and iv.n == 4
    one = stats.t_interval([0.5])
    assert one.how == "none" and not one.has_interval and one.excludes(0.0) == 0
    same = stats.t_interval([0.5, 0.5, 0.5])
    assert (same.low, same.high) == (0.5, 0.5)


def test_bootstrap_equals_scipy():
    iv = stats.bootstrap_metric(PRED_A, GOLD, accuracy, resamples=400)  # sklearn per resample: slow
    assert iv.mean == accuracy(PRED_A, GOLD) and iv.how == "bootstrap" and iv.n == 200
    assert (iv.low, iv.high) == pytest.approx(scipy_bootstrap((PRED_A, GOLD), accuracy, resamples=400), rel=1e-12)
    d = stats.paired_bootstrap(PRED_A, PRED_B, GOLD, accuracy, resamples=400)
    want = scipy_bootstrap((PRED_A, PRED_B, GOLD), lambda a, b, g: accuracy(a, g) - accuracy(b, g), resamples=400)
    assert d.mean == pytest.approx(accuracy(PRED_A, GOLD) - accuracy(PRED_B, GOLD))
    assert (d.low, d.high) == pytest.approx(want, rel=1e-12)
    # the vectorized accuracy the summaries use gives the same interval as sklearn's, in one call
    fast = stats.bootstrap_groups([(PRED_A, GOLD)], lambda gs: C.VECTORIZED["accuracy"](*gs[0]), vectorized=True,
                                  resamples=400)
    assert (fast.low, fast.high) == pytest.approx((iv.low, iv.high), rel=1e-12)
    m = stats.bootstrap_groups([(PRED_A, PRED_B, GOLD)], lambda gs: C.VECTORIZED["mcc"](gs[0][0], gs[0][2])
                               - C.VECTORIZED["mcc"](gs[0][1], gs[0][2]), vectorized=True)
    want = scipy_bootstrap((PRED_A, PRED_B, GOLD), lambda a, b, g, axis=-1: C.VECTORIZED["mcc"](a, g)
                           - C.VECTORIZED["mcc"](b, g), vectorized=True)
    assert m.mean == pytest.approx(mcc(PRED_A, GOLD) - mcc(PRED_B, GOLD)) and (m.low, m.high) == pytest.approx(want)


@pytest.mark.parametrize("name", ["accuracy", "mcc", "f1", "pearson"])
def test_vectorized_metrics_equal_the_task_metrics(name):
    from deltatune.bench.metrics import METRICS

    rng = np.random.default_rng(3)
    for trial in range(60):
        n = int(rng.integers(2, 30))
        if name == "pearson":
            gold = rng.normal(size=n)
            pred = np.ones(n) if trial % 5 == 0 else gold + rng.normal(size=n)  # a constant prediction: 0
        else:
            gold = np.ones(n, int) if trial % 7 == 0 else rng.integers(0, 2, n)
            pred = np.zeros(n, int) if trial % 5 == 0 else rng.integers(0, 2, n)  # one class, one-class gold
        assert float(C.VECTORIZED[name](pred, gold)) == pytest.approx(METRICS[name](pred, gold), abs=1e-12)
    stacked = rng.integers(0, 2, (4, 25)), rng.integers(0, 2, (4, 25))  # resamples along the first axis
    assert C.VECTORIZED[name](*stacked) == pytest.approx([METRICS[name](p, g) for p, g in zip(*stacked)])


def test_paired_t_equals_scipy_and_refuses_other_seeds():
    a, b = {0: 0.80, 1: 0.83, 2: 0.78}, {0: 0.75, 1: 0.79, 2: 0.77}
    iv = stats.paired_t(a, b)
    ci = st.ttest_rel([a[s] for s in (0, 1, 2)], [b[s] for s in (0, 1, 2)]).confidence_interval(0.95)
    assert (iv.low, iv.high) == pytest.approx((ci.low, ci.high), rel=1e-12)
    with pytest.raises(PairingError, match="seeds differ"):
        stats.paired_t(a, {0: 0.7, 1: 0.7, 3: 0.7})


def test_one_seed_differences_pair_the_same_examples():
    c = C.cells([record("a", 0, pred=PRED_A), record("b", 0, pred=PRED_B)])
    d = C.difference(c, "a", "b", ["SST-2"])
    acc = C.VECTORIZED["accuracy"]
    want = scipy_bootstrap((PRED_A, PRED_B, GOLD), lambda a, b, g, axis=-1: acc(a, g) - acc(b, g), vectorized=True)
    assert d.how == "bootstrap" and (d.low, d.high) == pytest.approx(want, rel=1e-12)
    s = C.score(c, "a", ["SST-2"])
    assert (s.low, s.high) == pytest.approx(scipy_bootstrap((PRED_A, GOLD), lambda a, g, axis=-1: acc(a, g), vectorized=True))
    # the same number of examples, but not the same ones: refused, not compared
    shifted = C.cells([record("a", 0), record("b", 0, ids=range(1, 201))])
    with pytest.raises(PairingError, match="different dev examples"):
        C.difference(shifted, "a", "b", ["SST-2"])


def test_several_seeds_pair_by_seed_and_refuse_other_seeds():
    a = [record("a", s, metric=m) for s, m in enumerate((0.80, 0.83, 0.78))]
    b = [record("b", s, metric=m) for s, m in enumerate((0.75, 0.79, 0.77))]
    c = C.cells(a + b)
    d = C.difference(c, "a", "b", ["SST-2"])
    ci = st.ttest_rel([0.80, 0.83, 0.78], [0.75, 0.79, 0.77]).confidence_interval(0.95)
    assert d.how == "t" and (d.low, d.high) == pytest.approx((ci.low, ci.high))
    assert C.score(c, "a", ["SST-2"]).how == "t"
    c2 = C.cells(a + b[:2] + [record("b", 5, metric=0.7)])
    with pytest.raises(PairingError, match="seeds"):
        C.difference(c2, "a", "b", ["SST-2"])


def test_convergence_reach_and_censoring():
    curve = [{"step": 0, "seconds": 0.0, "metric": 0.5}, {"step": 25, "seconds": 2.0, "metric": 0.7},
             {"step": 50, "seconds": 4.0, "metric": 0.85}]
    r = record("lora", 0, metric=0.85, curve=curve, steps=50)
    assert C.reach(r, 0.8) == (50, 4.0) and C.reach(r, 0.7) == (25, 2.0) and C.reach(r, 0.9) is None
    assert C.censored_steps(r, 0.9) == (75.0, True)
    c = C.cells([record("full", 0, metric=0.9, curve=curve[:2] + [{**curve[2], "metric": 0.9}], steps=50), r])
    assert C.target(c, "SST-2") == pytest.approx(0.81)
    assert C.steps_to(c, "lora", ["SST-2"]) == {0: (50.0, 0)}
