"""Synthetic results.jsonl records for the statistics and findings tests (no training)."""
import numpy as np

from deltatune.bench.metrics import accuracy

RNG = np.random.default_rng(7)
GOLD = RNG.integers(0, 2, 200)
PRED_A = np.where(RNG.random(200) < 0.85, GOLD, 1 - GOLD)
PRED_B = np.where(RNG.random(200) < 0.70, GOLD, 1 - GOLD)


def record(method, seed, metric=None, pred=None, gold=GOLD, ids=None, task="SST-2", curve=None,
           steps=100, eval_every=25, step_time=0.1, memory=100.0):
    pred = np.asarray(pred if pred is not None else PRED_A)
    dev = {"ids": list(ids if ids is not None else range(len(gold))), "pred": pred.tolist(), "gold": list(map(int, gold))}
    metric = accuracy(pred, np.asarray(gold)) if metric is None else metric
    curve = curve or [{"step": 0, "seconds": 0.0, "metric": 0.5}, {"step": steps, "seconds": 10.0, "metric": metric}]
    return {"key": f"{method}-{task}-{seed}", "status": "ok", "method": method, "task": task, "seed": seed,
            "metric_name": "accuracy", "metric": metric, "dev": dev, "curve": curve,
            "model": "synthetic", "environment": {}, "seconds": 1.0,
            "budget": {"steps": steps, "eval_every": eval_every, "dev_size": len(gold), "batch_size": 16,
                       "max_length": 64},
            "convergence": {"best": max(p["metric"] for p in curve)},
            "efficiency": {"step_time_median": step_time, "peak_mem_mb": 1000 + memory, "mem_start_mb": 1000.0,
                           "mem_kind": "cpu_rss", "trainable_percent": 1.0, "trainable": 1000,
                           "throughput": 100.0, "delta_bytes": 4000}}
