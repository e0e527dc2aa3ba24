"""Tokenised examples, the seeded training order, and padding to the longest in each batch."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .tasks import Examples

DEV_SEED = 0  # the dev subset is the same for every run seed, so seeds compare on equal data


class Encoded(Dataset):
    def __init__(self, features: list[dict[str, list[int]]], labels: list[Any], regression: bool):
        self.features, self.labels, self.regression = features, labels, regression

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.features[i], "labels": self.labels[i]}

    def reorder(self, order: list[int]) -> Encoded:
        return reorder(self, order)


def encode(tokenizer, examples: Examples, max_length: int, regression: bool) -> Encoded:
    feats = []
    for texts in examples.texts:
        enc = tokenizer(*texts, truncation=True, max_length=max_length)
        feats.append({k: list(v) for k, v in enc.items()
                      if k in ("input_ids", "attention_mask", "token_type_ids")})
    return Encoded(feats, list(examples.labels), regression)


def train_indices(n: int, steps: int, batch: int, seed: int) -> list[int]:
    """``steps * batch`` example indices: a seeded shuffle of the split, repeated as epochs if short."""
    rng = np.random.default_rng(seed)
    need, out = steps * batch, []
    while len(out) < need:
        out += rng.permutation(n).tolist()
    return out[:need]


def group_by_length(lengths: list[int], batch: int, seed: int, window: int = 8) -> list[int]:
    """A training order with little padding: within windows of ``window`` batches (in the seeded
    order), examples are sorted by length and cut into batches; the batches are then shuffled."""
    rng = np.random.default_rng(seed + 1)
    batches = []
    for start in range(0, len(lengths), window * batch):
        chunk = sorted(range(start, min(start + window * batch, len(lengths))), key=lambda i: -lengths[i])
        batches += [chunk[i:i + batch] for i in range(0, len(chunk), batch)]
    return [i for b in (batches[j] for j in rng.permutation(len(batches))) for i in b]


def length_order(data: Encoded) -> list[int]:
    """Indices longest first: batches of similar lengths pad little (order does not change scores)."""
    return sorted(range(len(data)), key=lambda i: -len(data.features[i]["input_ids"]))


def by_length(data: Encoded) -> Encoded:
    """Dev examples longest first (see `length_order`)."""
    return reorder(data, length_order(data))


def reorder(data: Encoded, order: list[int]) -> Encoded:
    return Encoded([data.features[i] for i in order], [data.labels[i] for i in order], data.regression)


def dev_indices(n: int, size: int) -> list[int]:
    """A fixed random dev subset (all of dev when size is 0 or at least the split)."""
    if size <= 0 or size >= n:
        return list(range(n))
    return sorted(np.random.default_rng(DEV_SEED).choice(n, size, replace=False).tolist())


class Collator:
    """Pads every sequence key to the batch's longest sequence (right padding)."""

    def __init__(self, pad_id: int, regression: bool):
        self.pad_id, self.regression = pad_id, regression

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(it["input_ids"]) for it in items)
        out = {}
        for key in items[0]:
            if key == "labels":
                continue
            fill = self.pad_id if key == "input_ids" else 0
            out[key] = torch.tensor([it[key] + [fill] * (width - len(it[key])) for it in items])
        dtype = torch.float32 if self.regression else torch.long
        out["labels"] = torch.tensor([it["labels"] for it in items], dtype=dtype)
        return out


def pad_id(tokenizer) -> int:
    value = getattr(tokenizer, "pad_token_id", None)
    return value if isinstance(value, int) else 0
