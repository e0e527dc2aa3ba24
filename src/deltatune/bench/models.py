"""Base models for the harness: the shipped MiniLM, any local HF directory, or ``tiny-<arch>``.

``tiny-bert`` (also gpt2, llama, t5) is a random 2-layer model from ``deltatune.models.tiny_model``
with a hashing word tokenizer: no files, a few milliseconds per step, for tests and smoke runs.
Its base weights are fixed (seed 0); the run's seed initialises the task head, as for real models.
"""
from __future__ import annotations

import copy
import re
import zlib
from typing import Any

import torch
import torch.nn as nn

from ..core.arch import head_modules
from ..models import DEFAULT_MODEL, TINY_ARCHS, load_classifier, tiny_model

TINY_PREFIX = "tiny-"


class HashTokenizer:
    """Lower-cased words to ids by CRC32: a stable tokenizer that needs no vocabulary file."""

    pad_token_id = 0

    def __init__(self, vocab_size: int, sep_id: int = 2, cls_id: int = 3, token_types: bool = False):
        self.vocab_size = vocab_size
        self.sep_id, self.cls_id, self.token_types = sep_id, cls_id, token_types

    def words(self, text: str) -> list[int]:
        return [4 + zlib.crc32(w.encode()) % (self.vocab_size - 4) for w in re.findall(r"\w+|[^\w\s]", text.lower())]

    def __call__(self, text: str, text_pair: str | None = None, truncation: bool = True,
                 max_length: int | None = None) -> dict[str, list[int]]:
        a = self.words(text)
        b = self.words(text_pair) if text_pair is not None else []
        room = (max_length or 10**9) - 2 - (text_pair is not None)
        while truncation and len(a) + len(b) > room:
            (a if len(a) >= len(b) else b).pop()
        ids = [self.cls_id, *a, self.sep_id] + ([*b, self.sep_id] if text_pair is not None else [])
        out = {"input_ids": ids, "attention_mask": [1] * len(ids)}
        if self.token_types:
            out["token_type_ids"] = [0] * (len(a) + 2) + [1] * (len(ids) - len(a) - 2)
        return out


def is_tiny(name: str | None) -> bool:
    return bool(name) and name.startswith(TINY_PREFIX)


def load_tiny(name: str, num_labels: int, seed: int) -> tuple[nn.Module, HashTokenizer]:
    arch = name[len(TINY_PREFIX):]
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny model {name!r}: use one of {[TINY_PREFIX + a for a in TINY_ARCHS]}")
    model = tiny_model(arch, task="cls", seed=0, num_labels=num_labels)
    reset_head(model, seed)
    eos = getattr(model.config, "eos_token_id", None)
    tok = HashTokenizer(model.config.vocab_size, sep_id=eos if isinstance(eos, int) else 2,
                        token_types=arch == "bert")
    return model, tok


def reset_head(model: nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    for name in head_modules(model):
        for m in getattr(model, name).modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()


def load_model(name: str | None, num_labels: int, seed: int = 0) -> tuple[nn.Module, Any]:
    """(classifier, tokenizer); the head is initialised from `seed`."""
    if is_tiny(name):
        return load_tiny(name, num_labels, seed)
    from transformers.utils import logging

    logging.disable_progress_bar()
    model, tok = load_classifier(name, num_labels=num_labels, seed=seed)
    if getattr(tok, "pad_token_id", None) is None and getattr(tok, "eos_token", None):
        tok.pad_token = tok.eos_token  # decoder-only tokenizers (GPT-2, Llama) have no pad token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id  # the classifier reads the last non-pad token
    return model, tok


def model_label(name: str | None) -> str:
    return name or DEFAULT_MODEL


def max_positions(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class ModelCache:
    """Loads each (model, labels, seed) once and hands out fresh deep copies."""

    def __init__(self, name: str | None):
        self.name = name
        self._cache: dict[tuple[int, int], tuple[nn.Module, Any]] = {}

    def get(self, num_labels: int, seed: int) -> tuple[nn.Module, Any]:
        key = (num_labels, seed)
        if key not in self._cache:
            self._cache[key] = load_model(self.name, num_labels, seed)
        model, tok = self._cache[key]
        return copy.deepcopy(model), tok
