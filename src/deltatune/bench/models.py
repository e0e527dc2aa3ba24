"""Base models for the harness: the shipped MiniLM, ``smollm2``, any local HF directory, or
``tiny-<arch>``.

The task's kind decides the model class: classification / regression build a
``...ForSequenceClassification`` (a fresh head), ``causal_lm`` a ``...ForCausalLM`` and ``seq2seq``
a ``...ForConditionalGeneration``. A model that cannot do the task (an encoder for a causal LM, a
decoder-only model for seq2seq) is refused with the fix, never loaded under another head.

``tiny-bert`` (also gpt2, llama, t5) is a random 2-layer model from ``deltatune.models.tiny_model``:
for classification with a hashing word tokenizer, for generation with a byte-level HF tokenizer
(``tiny_tokenizer``, which decodes). Its base weights are fixed (seed 0); the run's seed
initialises the task head, as for real models.
"""
from __future__ import annotations

import copy
import re
import zlib
from typing import Any

import torch
import torch.nn as nn

from ..core.arch import head_modules
from ..models import DEFAULT_MODEL, TINY_ARCHS, TINY_VOCAB_SIZE, load_classifier, tiny_model

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


GEN_CLASSES = {"causal_lm": "AutoModelForCausalLM", "seq2seq": "AutoModelForSeq2SeqLM"}
TINY_GEN = {"causal_lm": ("gpt2", "llama"), "seq2seq": ("t5",)}
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def load_model(name: str | None, num_labels: int, seed: int = 0, kind: str = "classification") -> tuple[nn.Module, Any]:
    """(model, tokenizer) for a task of `kind`; a classifier's head is initialised from `seed`."""
    if kind in GEN_CLASSES:
        return load_generator(name, kind)
    if is_tiny(name):
        return load_tiny(name, num_labels, seed)
    from transformers.utils import logging

    logging.disable_progress_bar()
    model, tok = load_classifier(name, num_labels=num_labels, seed=seed)
    pad_with_eos(tok)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id  # the classifier reads the last non-pad token
    return model, tok


def pad_with_eos(tok) -> Any:
    """Decoder-only tokenizers (GPT-2, Llama) have no pad token: pad with eos (masked everywhere)."""
    if getattr(tok, "pad_token_id", None) is None and getattr(tok, "eos_token", None):
        tok.pad_token = tok.eos_token
    return tok


def load_generator(name: str | None, kind: str) -> tuple[nn.Module, Any]:
    """A causal LM or an encoder-decoder, with its tokenizer (pad token = eos when it has none)."""
    from ..errors import ConfigError
    from ..models import resolve_model_path

    if is_tiny(name):
        arch = name[len(TINY_PREFIX):]
        check_generator(arch, kind, name, [])
        from ..models import tiny_tokenizer

        # longer contexts for byte-level ids; T5's eos is the tokenizer's </s> (its config says 1)
        longer = {"gpt2": {"n_positions": 512}, "t5": {"eos_token_id": 2}}.get(arch, {"max_position_embeddings": 512})
        return tiny_model(arch, task="lm", seed=0, vocab_size=TINY_VOCAB_SIZE, **longer), tiny_tokenizer()
    import transformers
    from transformers.utils import logging

    logging.disable_progress_bar()
    path = resolve_model_path(name)
    config = transformers.AutoConfig.from_pretrained(path)
    check_generator(config.model_type, kind, name or "the default model", config.architectures or [],
                    config.is_encoder_decoder)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    try:
        model = getattr(transformers, GEN_CLASSES[kind]).from_pretrained(path)
    except ValueError as e:
        raise ConfigError(f"{name}: transformers cannot build a {kind} model from it ({e}).") from None
    pad_with_eos(tok)
    model.eval()
    return model, tok


def check_generator(model_type: str, kind: str, name: str | None, architectures: list[str],
                    encoder_decoder: bool | None = None) -> None:
    """Refuse a model that cannot do a generation task of `kind`, naming the fix."""
    from ..errors import ConfigError

    if is_tiny(name):
        if model_type not in TINY_GEN[kind]:
            raise ConfigError(f"{name} cannot do a {kind} task: use "
                              f"{' or '.join(TINY_PREFIX + a for a in TINY_GEN[kind])}.")
        return
    if kind == "seq2seq" and not encoder_decoder:
        raise ConfigError(f"{name} ({model_type}) is not an encoder-decoder: a seq2seq task "
                          f"(source=/target=) needs one such as T5; for a decoder-only model give the "
                          f"data as prompt=COL,completion=COL (a causal-LM task).")
    if kind == "causal_lm":
        if encoder_decoder:
            raise ConfigError(f"{name} ({model_type}) is an encoder-decoder: give the task as "
                              f"source=COL,target=COL (seq2seq), or use a decoder-only model (e.g. smollm2).")
        if architectures and not any(a.endswith(CAUSAL_SUFFIXES) for a in architectures):
            raise ConfigError(f"{name} is a {', '.join(architectures)} ({model_type}), not a causal language "
                              f"model: a causal-LM task needs a decoder such as --model smollm2 or a local "
                              f"GPT-2 / Llama directory.")


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
    """Loads each (model, task kind, labels, seed) once and hands out fresh deep copies."""

    def __init__(self, name: str | None):
        self.name = name
        self._cache: dict[tuple[int, int], tuple[nn.Module, Any]] = {}

    def get(self, task, seed: int) -> tuple[nn.Module, Any]:
        """A fresh copy of the base for `task` (a ``tasks.Task``); generation models have no head,
        so one copy serves every seed."""
        key = (task.kind, task.num_labels, 0 if task.generative else seed)
        if key not in self._cache:
            self._cache[key] = load_model(self.name, task.num_labels, seed, task.kind)
        model, tok = self._cache[key]
        return copy.deepcopy(model), tok
