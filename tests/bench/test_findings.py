"""The findings section decides a claim only when the paired intervals allow it: synthetic results
whose methods are separated get a verdict, overlapping ones get "cannot tell"."""
from deltatune.bench import compare as C
from deltatune.bench import findings as F
from deltatune.bench import report
from deltatune.bench.stats import Interval

from synthetic_results import record

METHODS = ["full", "lora", "adapter", "prefix", "prompt"]


def run(scores: dict[str, list[float]], reach_at: dict[str, list[int | None]] | None = None,
        step_time: dict[str, float] | None = None):
    """Records for 3 seeds: final scores per method, and the step at which each seed's curve
    jumps from 0.5 to its final score (None: it stays at 0.5 until the last step)."""
    recs = []
    for m, vals in scores.items():
        for seed, v in enumerate(vals):
            at = (reach_at or {}).get(m, [25, 25, 25])[seed]
            curve = [{"step": s, "seconds": s / 10, "metric": v if at is not None and s >= at else 0.5}
                     for s in (0, 25, 50, 75, 100)]
            curve[-1]["metric"] = v if at is not None else 0.5
            recs.append(record(m, seed, metric=v if at is not None else 0.5, curve=curve,
                               step_time=(step_time or {}).get(m, 0.1) * (1 + 0.01 * seed),
                               memory=400.0 if m == "full" else 100.0 + seed))
    return C.cells(recs), [m for m in scores]


SEPARATED = {"full": [0.90, 0.91, 0.92], "lora": [0.85, 0.86, 0.88], "adapter": [0.80, 0.82, 0.83],
             "prefix": [0.70, 0.71, 0.74], "prompt": [0.60, 0.62, 0.63]}
OVERLAPPING = {"full": [0.80, 0.70, 0.90], "lora": [0.86, 0.72, 0.80], "adapter": [0.75, 0.84, 0.76],
               "prefix": [0.80, 0.70, 0.78], "prompt": [0.70, 0.79, 0.74]}


def test_separated_results_get_a_verdict_overlapping_ones_cannot_tell():
    c, methods = run(SEPARATED)
    assert F.performance(c, methods, ["SST-2"]).verdict == F.SUPPORTS
    c, methods = run(OVERLAPPING)
    found = F.performance(c, methods, ["SST-2"])
    assert found.verdict == F.CANNOT_TELL
    assert all(line.endswith(F.CANNOT_TELL) for line in found.checks)
    # the marginal intervals overlap, and so does every paired difference with 0
    assert C.score(c, "full", ["SST-2"]).overlaps(C.score(c, "lora", ["SST-2"]))
    reversed_ = {**SEPARATED, "prompt": [0.80, 0.81, 0.83]}
    c, methods = run(reversed_)
    found = F.performance(c, methods, ["SST-2"])
    assert found.verdict == F.CONTRADICTS and found.checks[-1].endswith(F.CONTRADICTS)


def test_convergence_verdicts():
    scores = {m: [0.9, 0.9, 0.9] for m in METHODS}
    paper = {"full": [25, 25, 25], "adapter": [50, 50, 50], "lora": [50, 50, 50], "prefix": [75, 75, 75],
             "prompt": [None, None, None]}
    c, methods = run(scores, paper)
    found = F.convergence(c, methods, ["SST-2"], eval_every=25)
    assert found.verdict == F.SUPPORTS, found.checks
    noisy = {**paper, "adapter": [25, 75, 50], "lora": [50, 25, 75]}
    c, methods = run(scores, noisy)
    found = F.convergence(c, methods, ["SST-2"], eval_every=25)
    assert found.verdict == F.CANNOT_TELL, found.checks
    swapped = {**paper, "full": [100, 100, 100]}
    c, methods = run(scores, swapped)
    assert F.convergence(c, methods, ["SST-2"], eval_every=25).verdict == F.CONTRADICTS


def test_savings_and_combinations():
    c, methods = run(SEPARATED, step_time={"full": 0.3})
    mem, time = F.savings(c, methods, ["SST-2"], "memory"), F.savings(c, methods, ["SST-2"], "step time")
    assert mem.verdict == time.verdict == F.SUPPORTS and len(mem.checks) == 4
    c, methods = run(SEPARATED, step_time={"prompt": 0.5})
    assert F.savings(c, methods, ["SST-2"], "step time").verdict == F.CONTRADICTS
    combos = {"adapter": [0.80, 0.82, 0.83], "adapter+prompt": [0.70, 0.73, 0.74],
              "bitfit": [0.78, 0.79, 0.80], "prompt+bitfit": [0.70, 0.70, 0.72]}
    c, methods = run(combos)
    found = F.combinations(c, methods, ["SST-2"])
    assert found.verdict == F.SUPPORTS and len(found.checks) == 3 and "not measured" in found.checks[2]
    assert F.resolve(methods, {"prompt", "bitfit"}) == "prompt+bitfit"  # order-free
    c, methods = run({**combos, "adapter+prompt": [0.86, 0.74, 0.80]})
    assert F.combinations(c, methods, ["SST-2"]).verdict == F.CANNOT_TELL


def test_unmeasured_claims_and_the_markdown():
    c, methods = run({"full": [0.9, 0.9, 0.9], "lora": [0.8, 0.81, 0.8]})
    found = F.performance(c, methods, ["SST-2"])
    assert found.verdict == F.CANNOT_TELL  # full > lora holds, the rest of the chain was not run
    assert F.overall([F.NOT_MEASURED]) == F.NOT_MEASURED
    assert F.verdict_of(Interval(1.0, 1.0, 1.0, 1, "none")) == F.CANNOT_TELL  # one seed: no interval
    c, methods = run(SEPARATED)
    records = [r for rs in c.values() for r in rs.values()]
    md = report.summary_markdown(records, methods, [("SST-2", "accuracy")])
    assert "## Findings" in md and "**supports**" in md and "## Paired differences" in md
    assert "| `lora` | **-4.7 [-6.1, -3.2]** | – |" in md  # lora - full, separated: bold


def test_step_times_measured_on_a_shared_machine_are_marked():
    quiet = [record(m, s) for m in ("full", "lora") for s in (0, 1, 2)]
    md = report.summary_markdown(quiet, ["full", "lora"], [("SST-2", "accuracy")])
    assert "‡" not in md
    busy = [dict(r, efficiency={**r["efficiency"], "other_cpu": 0.9 if r["method"] == "lora" and r["seed"] == 1 else 0.1})
            for r in quiet]
    md = report.summary_markdown(busy, ["full", "lora"], [("SST-2", "accuracy")])
    eff = md.split("## Efficiency")[1].split("## Convergence")[0]
    lora = next(line for line in eff.splitlines() if line.startswith("| `lora`"))
    full = next(line for line in eff.splitlines() if line.startswith("| `full`"))
    assert "| 100‡ |" in lora and "‡" not in full
    assert "other processes kept 0.25+ CPU cores busy (1 of 6 runs, up to 0.9 cores)" in md


def test_peak_memory_counts_the_cores_other_processes_keep_busy(monkeypatch):
    """others = (machine busy seconds - this process's CPU seconds) / wall seconds."""
    import torch

    from deltatune.bench import measure

    clock = iter([(100.0, 50.0, 10.0), (104.0, 59.0, 13.0)])  # 4 s: machine +9 CPU s, we +3
    monkeypatch.setattr(measure, "_busy_seconds", lambda: next(clock))
    with measure.PeakMemory(torch.device("cpu")) as m:
        pass
    assert m.others == 1.5
    monkeypatch.undo()
    (_, busy0, mine0), (_, busy1, mine1) = measure._busy_seconds(), measure._busy_seconds()
    assert 0 <= mine0 <= busy1 and busy0 <= busy1 and mine0 <= mine1  # the real counters, monotone
