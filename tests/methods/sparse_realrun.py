"""A two-phase SST-2 run of the real model for the sparse methods (train, switch, train again).

The task head and the base differences get their own learning rates (as in the papers, where
the differences are fine-tuning-sized and the fresh head is not); a new optimizer follows the
switch because the trainable tensors change.
"""
from __future__ import annotations

import time

import torch

import deltatune as dt
from deltatune.core.layer import ParamCopy
from deltatune.models import load_classifier
from realrun import accuracy, batches


def optimizer(dm, delta, lr: float, head_lr: float, gate_lr: float | None = None):
    heads = [p for lay in delta.layers.values() if isinstance(lay, ParamCopy) for p in lay.parameters()]
    gates = delta.gate_parameters() if gate_lr and not delta.is_compact else []
    taken = {id(p) for p in heads + gates}
    rest = [p for p in dm.trainable_parameters() if id(p) not in taken]
    groups = [{"params": rest, "lr": lr}, {"params": heads, "lr": head_lr}]
    if gates:
        groups.append({"params": gates, "lr": gate_lr})
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)


def train(dm, data, opt, first_step: int = 0) -> float:
    """Seconds per step."""
    dm.train()
    start = time.perf_counter()
    for i, b in enumerate(data):
        loss = dm(**b).loss + dm.regularization()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dm.step(first_step + i)
    return (time.perf_counter() - start) / max(len(data), 1)


def two_phase_run(config, switch: str, steps: tuple[int, int], lr: tuple[float, float],
                  head_lr: float, gate_lr: float | None = None, seed: int = 0, n_dev: int = 400,
                  batch: int = 16) -> dict:
    torch.manual_seed(seed)
    model, _ = load_classifier(seed=seed)
    dm = dt.wrap(model, config)
    delta = dm.get_delta("default")
    dev = batches("dev", n_dev, 64, seed)
    data = batches("train", sum(steps) * batch, batch, seed)
    out = {"before": accuracy(dm, dev)}
    t1 = train(dm, data[:steps[0]], optimizer(dm, delta, lr[0], head_lr, gate_lr))
    out["phase1"] = accuracy(dm, dev)
    out["k"] = getattr(delta, switch)()
    out["switched"] = accuracy(dm, dev)
    t2 = train(dm, data[steps[0]:], optimizer(dm, delta, lr[1], head_lr), steps[0])
    out["after"] = accuracy(dm, dev)
    out["step_s"] = (t1 * steps[0] + t2 * steps[1]) / sum(steps)
    out["dm"] = dm
    return out
