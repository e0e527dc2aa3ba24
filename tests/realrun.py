"""A short fine-tune of the shipped real model (MiniLM) on SST-2, shared by the method tests.

Dynamic padding and a small train subset keep one run to well under a minute on 2 CPU cores.
"""
from __future__ import annotations

import csv
import functools
from importlib import resources

import torch

import deltatune
from deltatune.models import load_classifier


@functools.lru_cache(maxsize=2)
def sst2(split: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    path = resources.files("deltatune") / "data" / "glue" / "SST-2" / f"{split}.tsv"
    with path.open(encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return tuple(r[0] for r in rows), tuple(int(r[1]) for r in rows)


@functools.lru_cache(maxsize=1)
def tokenizer():
    return load_classifier()[1]


def batches(split: str, n: int, batch: int, seed: int, max_len: int = 48):
    texts, labels = sst2(split)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(texts), generator=g)[:n].tolist() if split == "train" else list(range(min(n, len(texts))))
    tok = tokenizer()
    out = []
    for i in range(0, len(idx), batch):
        chunk = idx[i:i + batch]
        enc = tok([texts[j] for j in chunk], truncation=True, max_length=max_len, padding=True,
                  return_tensors="pt")
        enc["labels"] = torch.tensor([labels[j] for j in chunk])
        out.append(dict(enc))
    return out


@torch.no_grad()
def accuracy(model, dev) -> float:
    model.eval()
    right = total = 0
    for b in dev:
        inputs = {k: v for k, v in b.items() if k != "labels"}
        pred = model(**inputs).logits.argmax(-1)
        right += (pred == b["labels"]).sum().item()
        total += len(pred)
    return right / total


def finetune(config, steps: int = 120, lr: float = 2e-3, batch: int = 16, seed: int = 0,
             n_dev: int = 400, wrap=None, clip: float | None = None, warmup: int = 0):
    """(dev accuracy untrained, dev accuracy after `steps` steps, the DeltaModel).

    ``clip``: max gradient norm; ``warmup``: linear warm-up steps. Methods with a sharp learning-rate
    edge (soft prompts) need both, else the run is chaotic: a CPU with other kernels diverges."""
    torch.manual_seed(seed)
    model, _ = load_classifier(seed=seed)
    dm = (wrap or deltatune.wrap)(model, config)
    dev = batches("dev", n_dev, 64, seed)
    before = accuracy(dm, dev)
    train = batches("train", steps * batch, batch, seed)
    params = dm.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    dm.train()
    for step, b in enumerate(train):
        loss = dm(**b).loss + dm.regularization()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        dm.step(step)
    return before, accuracy(dm, dev), dm
