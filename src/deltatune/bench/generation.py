"""Batched, deterministic generation for scoring (BLEU/ROUGE) and `deltatune generate`.

Prompts are sorted by length into batches so little compute goes to padding, then the texts are
put back in input order. Decoder-only models are padded on the LEFT, so every prompt ends at the
last position and the new tokens start at the same column for the whole batch. Padding is done
here (with an attention mask), not by mutating the tokenizer, so the caller's tokenizer is
never changed, even if generation fails.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ConfigError


def _encode(tokenizer: Any, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
    """Token ids per prompt; id lists pass through so callers can truncate prompts themselves."""
    if all(isinstance(p, str) for p in prompts):
        ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    elif not any(isinstance(p, str) for p in prompts):
        ids = [[int(t) for t in p] for p in prompts]
    else:
        raise ConfigError("prompts mix strings and token-id lists: pass all of one kind.")
    for i, p in enumerate(ids):
        if not p:
            raise ConfigError(f"prompt {i} has no tokens: a model cannot continue an empty prompt.")
    return ids


def _pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its eos (decoder-only tokenizers often have no pad token)."""
    for pid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pid is not None:
            return int(pid)
    raise ConfigError("the tokenizer has neither a pad nor an eos token: set tokenizer.pad_token.")


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Stop at the model's eos ids and the tokenizer's (chat models may have several)."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def _pad(batch: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, p in enumerate(batch):
        cols = slice(width - len(p), width) if left else slice(0, len(p))
        ids[row, cols] = torch.tensor(p, dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


def _until_eos(row: list[int], eos: list[int]) -> list[int]:
    """New tokens before the first eos: generate keeps the eos and pads after it, and a model's
    eos need not be a special token that decoding would drop."""
    cut = next((k for k, t in enumerate(row) if t in eos), len(row))
    return row[:cut]


def _device(model: Any) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def generate_texts(model: Any, tokenizer: Any, prompts: Sequence[str] | Sequence[Sequence[int]],
                   max_new_tokens: int = 64, num_beams: int = 1, batch_size: int = 16,
                   encoder_decoder: bool | None = None, use_cache: bool = True) -> list[str]:
    """The continuation of each prompt (new text only, special tokens dropped, stripped), in order.

    Greedy (num_beams=1) or beam search, never sampling, so scores are reproducible. `model` is a
    Hugging Face generation model or a wrapper forwarding `.generate`/`.config` (DeltaModel).
    `use_cache=False` exists to check the KV cache against a cache-free run.
    """
    for name, value in (("max_new_tokens", max_new_tokens), ("num_beams", num_beams), ("batch_size", batch_size)):
        if int(value) < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}.")
    if len(prompts) == 0:
        return []
    if encoder_decoder is None:
        encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    ids = _encode(tokenizer, prompts)
    pad_id, eos, device = _pad_id(tokenizer), _eos_ids(model, tokenizer), _device(model)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # longest first: OOM shows at once
    texts: list[str] = [""] * len(ids)
    was_training = model.training
    model.eval()  # dropout would make greedy decoding random
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            input_ids, mask = _pad([ids[i] for i in chunk], pad_id, left=not encoder_decoder)
            with torch.no_grad():
                out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                     max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                                     use_cache=use_cache, pad_token_id=pad_id,
                                     eos_token_id=eos or None)
            # decoder-only output repeats the (padded) prompt; enc-dec output starts with the decoder start id
            new = out[:, 1:] if encoder_decoder else out[:, input_ids.shape[1]:]
            rows = [_until_eos(row, eos) for row in new.tolist()]
            for i, text in zip(chunk, tokenizer.batch_decode(rows, skip_special_tokens=True)):
                texts[i] = text.strip()
    finally:
        model.train(was_training)
    return texts
