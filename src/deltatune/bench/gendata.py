"""Token ids for generation tasks.

- causal LM: prompt + completion + eos, the loss on the completion tokens only (``-100`` on the
  prompt) unless ``loss_on_prompt``; chat turns go through the tokenizer's chat template and the
  loss goes on the assistant turns (the template's own end-of-turn tokens included).
- seq2seq: source ids for the encoder, target ids (+ eos) as labels.
Too long: a prompt loses tokens from the left (its first token kept when it is the tokenizer's
bos), the completion keeps its start; both are counted in ``notes``, never silent.
Packing (optional, causal LM): several examples in one row, positions restarting at 0 for each,
no attention mask and no cache, so that transformers' masks keep them apart (checked on the
model and its deltas before training, see `check_packing`).
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError
from .tasks import GenExamples, Task

IGNORE = -100


class LMEncoded(Dataset):
    """Examples as {input_ids, labels[, position_ids]} lists; ``notes`` counts what was changed."""

    def __init__(self, features: list[dict[str, list[int]]], notes: Counter | None = None, packed: bool = False):
        self.features, self.notes, self.packed = features, Counter(notes or {}), packed

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.features[i]

    def reorder(self, order: list[int]) -> LMEncoded:
        return LMEncoded([self.features[i] for i in order], self.notes, self.packed)

    def lengths(self) -> list[int]:
        return [len(f["input_ids"]) for f in self.features]


class LMCollator:
    """Right-pads input ids (pad id), labels (-100) and the attention mask; packed rows carry
    position ids instead of a mask."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(it["input_ids"]) for it in items)
        fills = {"input_ids": self.pad_id, "labels": IGNORE, "attention_mask": 0}
        out = {}
        for key in items[0]:
            if key == "position_ids":  # padding continues as its own run of positions
                out[key] = torch.tensor([it[key] + list(range(width - len(it[key]))) for it in items])
            else:
                out[key] = torch.tensor([it[key] + [fills[key]] * (width - len(it[key])) for it in items])
        if "position_ids" in out:
            out["use_cache"] = False  # transformers separates packed examples only without a cache
        else:
            out["attention_mask"] = torch.tensor([[1] * len(it["input_ids"]) + [0] * (width - len(it["input_ids"]))
                                                  for it in items])
        return out


# -- prompts --------------------------------------------------------------------------------------
def render_prompt(task: Task, prompt: Any) -> Any:
    """The model's input for a raw prompt: the task's template around a text; chat turns as they are."""
    return prompt if isinstance(prompt, list) else task.template.replace("{}", prompt)


def eos_id(tokenizer) -> int:
    value = getattr(tokenizer, "eos_token_id", None)
    if not isinstance(value, int):
        raise ConfigError("the tokenizer has no eos token: a generation task needs one so the model learns "
                          "where a completion ends (set tokenizer.eos_token).")
    return value


def require_chat_template(tokenizer, task: Task) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"task {task.name!r} has chat turns (messages=...), but the tokenizer has no chat "
                          f"template: use a model whose tokenizer has one (e.g. --model smollm2), set "
                          f"tokenizer.chat_template, or give the data as prompt=COL,completion=COL.")


def _chat_ids(tokenizer, turns: list[dict[str, str]], generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(turns, tokenize=True, add_generation_prompt=generation_prompt)
    if not isinstance(out, list):  # a BatchEncoding in newer transformers
        out = out["input_ids"]
    return list(out)


def prompt_ids(tokenizer, task: Task, prompt: Any) -> list[int]:
    """Token ids of a rendered prompt (chat: up to the assistant's turn, generation prompt added)."""
    if isinstance(prompt, list):
        require_chat_template(tokenizer, task)
        return _chat_ids(tokenizer, prompt[:-1], generation_prompt=True)
    return list(tokenizer(render_prompt(task, prompt))["input_ids"])


def left_truncate(ids: list[int], keep: int, bos: int | None) -> list[int]:
    if len(ids) <= keep:
        return ids
    if bos is not None and ids and ids[0] == bos and keep > 1:
        return [bos] + ids[len(ids) - keep + 1:]
    return ids[len(ids) - keep:]


def _fit(p: list[int], c: list[int], max_length: int, bos: int | None, notes: Counter) -> tuple[list[int], list[int]]:
    """Prompt and completion within max_length: the prompt loses its left end first, keeping at
    least a quarter of the room; then the completion its right end."""
    if len(p) + len(c) <= max_length:
        return p, c
    keep_p = min(len(p), max(max_length - len(c), max_length // 4, 1))
    keep_c = max_length - keep_p
    if keep_p < len(p):
        notes["prompts_truncated"] += 1
    if keep_c < len(c):
        notes["completions_truncated"] += 1
    return left_truncate(p, keep_p, bos), c[:keep_c]


# -- encoding -------------------------------------------------------------------------------------
def encode_causal(tokenizer, task: Task, examples: GenExamples, max_length: int,
                  loss_on_prompt: bool = False) -> LMEncoded:
    eos, bos = eos_id(tokenizer), getattr(tokenizer, "bos_token_id", None)
    notes: Counter = Counter(examples.notes)
    feats = []
    for prompt, completion in zip(examples.prompts, examples.completions):
        if isinstance(prompt, list):
            ids, labels = _chat_example(tokenizer, task, prompt, max_length, notes)
        else:
            p = prompt_ids(tokenizer, task, prompt)
            c = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + [eos]
            p, c = _fit(p, c, max_length, bos, notes)
            ids, labels = p + c, [IGNORE] * len(p) + c
        if loss_on_prompt:
            labels = list(ids)
        feats.append({"input_ids": ids, "labels": labels})
    return LMEncoded(feats, notes)


def _chat_example(tokenizer, task: Task, turns: list[dict[str, str]], max_length: int,
                  notes: Counter) -> tuple[list[int], list[int]]:
    """The whole conversation; labels on each assistant turn (from after the template's
    generation prompt to the end of that turn)."""
    require_chat_template(tokenizer, task)
    ids = _chat_ids(tokenizer, turns)
    labels = [IGNORE] * len(ids)
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        start = _chat_ids(tokenizer, turns[:i], generation_prompt=True)
        end = len(_chat_ids(tokenizer, turns[:i + 1]))
        if ids[:len(start)] != start:
            raise ConfigError("the tokenizer's chat template renders a conversation differently from its "
                              "beginning (not prefix-stable), so the assistant turns cannot be located: "
                              "give the data as prompt=COL,completion=COL instead.")
        labels[len(start):end] = ids[len(start):end]
    if len(ids) > max_length:
        last = next(j for j in range(len(labels) - 1, -1, -1) if labels[j] != IGNORE)
        first = next(j for j in range(last, -1, -1) if labels[j] == IGNORE) + 1
        cut = min(len(ids) - max_length, first)  # drop from the left, up to the last assistant turn
        notes["prompts_truncated"] += 1
        ids, labels = ids[cut:], labels[cut:]
        if len(ids) > max_length:
            notes["completions_truncated"] += 1
            ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels


def encode_seq2seq(tokenizer, task: Task, examples: GenExamples, max_length: int,
                   loss_on_prompt: bool = False) -> LMEncoded:
    eos = eos_id(tokenizer)
    notes: Counter = Counter(examples.notes)
    feats = []
    for source, target in zip(examples.prompts, examples.completions):
        s = prompt_ids(tokenizer, task, source)
        t = list(tokenizer(target)["input_ids"])
        if not t or t[-1] != eos:
            t.append(eos)
        if len(s) > max_length:
            notes["prompts_truncated"] += 1
            s = s[:max_length - 1] + [s[-1]] if s[-1] == eos else s[:max_length]
        if len(t) > max_length:
            notes["completions_truncated"] += 1
            t = t[:max_length - 1] + [eos]
        feats.append({"input_ids": s, "labels": t})
    return LMEncoded(feats, notes)


ENCODERS = {"causal_lm": encode_causal, "seq2seq": encode_seq2seq}


def encode_gen(tokenizer, task: Task, examples: GenExamples, max_length: int,
               loss_on_prompt: bool = False) -> LMEncoded:
    return ENCODERS[task.kind](tokenizer, task, examples, max_length, loss_on_prompt)


# -- packing --------------------------------------------------------------------------------------
def pack(data: LMEncoded, rows: int, max_length: int, seed: int) -> LMEncoded:
    """``rows`` rows of up to ``max_length`` tokens filled with whole examples, taken in a seeded
    order (repeated as epochs). Each example's positions restart at 0 and its first label is
    ignored (it would be predicted from the previous example)."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    out, cur = [], {"input_ids": [], "labels": [], "position_ids": []}
    while len(out) < rows:
        if not order:
            order = rng.permutation(len(data)).tolist()
        f = data.features[order.pop(0)]
        if cur["input_ids"] and len(cur["input_ids"]) + len(f["input_ids"]) > max_length:
            out.append(cur)
            cur = {"input_ids": [], "labels": [], "position_ids": []}
        cur["input_ids"] += f["input_ids"]
        cur["labels"] += [IGNORE] + f["labels"][1:]
        cur["position_ids"] += list(range(len(f["input_ids"])))
    return LMEncoded(out[:rows], data.notes, packed=True)


@torch.no_grad()
def check_packing(model, pad: int, length: int = 6) -> None:
    """Two examples packed in one row must give the logits each gives alone; else the model (or
    a delta on it) lets packed examples attend to each other, and packing is refused."""
    vocab = model.config.vocab_size if hasattr(model, "config") else 100
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(3, max(vocab, 4), (1, length), generator=g).to(device) for _ in range(2))
    pos = torch.arange(length, device=device).repeat(2)[None]
    was = model.training
    model.eval()
    try:
        packed = model(input_ids=torch.cat([a, b], 1), position_ids=pos, use_cache=False).logits
        alone = torch.cat([model(input_ids=x, attention_mask=torch.ones_like(x)).logits for x in (a, b)], 1)
    finally:
        model.train(was)
    if not torch.allclose(packed.float(), alone.float(), atol=1e-4, rtol=1e-4):
        raise ConfigError("packing is not exact here: with this model (or its delta, e.g. a prefix that "
                          "adds cached keys) packed examples attend to each other. Turn packing off (--no-pack).")
