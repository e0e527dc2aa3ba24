"""Scoring a generation task on its dev split: loss and perplexity of the references
(teacher-forced), and greedy (or beam) generations scored against every reference of each input
with BLEU, ROUGE-L and exact match (`genmetrics`).

The dev subset counts distinct inputs (E2E: meaning representations), so ``dev_size=N`` scores
N inputs against all of their references; the loss uses each input's first reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .data import dev_indices
from .gendata import IGNORE, LMCollator, LMEncoded, encode_gen, left_truncate, prompt_ids
from .tasks import GenExamples, Task

LOSS_BATCH = 16  # full-vocabulary logits of a dev batch are materialised: keep batches small


@dataclass
class GenDev:
    """What scoring needs, tokenised once: loss pairs, prompt ids, references."""

    loss_data: LMEncoded
    prompts: list[list[int]]
    references: list[list[str]]
    inputs: list[Any]  # the raw inputs, for predictions files
    notes: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)


def gen_dev(tokenizer, task: Task, examples: GenExamples, dev_size: int, max_length: int) -> GenDev:
    """``dev_size`` distinct inputs (0: all), chosen by a fixed seed, with all their references."""
    firsts, refs = examples.inputs(), examples.references()
    chosen = dev_indices(len(firsts), dev_size)
    pairs = examples.subset([firsts[i] for i in chosen])
    loss_data = encode_gen(tokenizer, task, pairs, max_length)
    bos = getattr(tokenizer, "bos_token_id", None)
    prompts = [left_truncate(prompt_ids(tokenizer, task, p), max_length, bos) for p in pairs.prompts]
    return GenDev(loss_data, prompts, [refs[i] for i in chosen], list(pairs.prompts), dict(loss_data.notes))


@torch.no_grad()
def dev_loss(model, data: LMEncoded, pad: int, seq2seq: bool, device) -> dict[str, float]:
    """Mean loss per completion token, and its exponential (perplexity)."""
    total, count = 0.0, 0
    for batch in DataLoader(data, batch_size=LOSS_BATCH, collate_fn=LMCollator(pad)):
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        if seq2seq:
            logits = model(**batch, labels=labels).logits
        else:
            logits = model(**batch).logits[:, :-1]
            labels = labels[:, 1:]
        mask = labels != IGNORE
        total += float(F.cross_entropy(logits[mask].float(), labels[mask], reduction="sum"))
        count += int(mask.sum())
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def cut_at(text: str, stop: str | None) -> str:
    return text.split(stop, 1)[0].strip() if stop else text.strip()


class GenScorer:
    """Dev metrics of a generation task; ``outputs`` keeps the generations of the last call."""

    def __init__(self, dev: GenDev, task: Task, tokenizer, pad: int, max_new_tokens: int = 64,
                 num_beams: int = 1, batch_size: int = 16):
        self.dev, self.task, self.tokenizer, self.pad = dev, task, tokenizer, pad
        self.max_new_tokens, self.num_beams, self.batch_size = max_new_tokens, num_beams, batch_size
        self.outputs: list[str] = []

    def __len__(self) -> int:
        return len(self.dev)

    def prepare(self, acc) -> None:
        """Nothing to shard: every process scores the whole (small) dev subset alike."""

    @torch.no_grad()
    def __call__(self, model, acc) -> dict[str, float]:
        from .generation import generate_texts
        from .genmetrics import generation_scores

        was_training = model.training
        model.eval()
        try:
            net = acc.unwrap_model(model)
            out = dev_loss(net, self.dev.loss_data, self.pad, self.task.kind == "seq2seq", acc.device)
            texts = generate_texts(net, self.tokenizer, self.dev.prompts, max_new_tokens=self.max_new_tokens,
                                   num_beams=self.num_beams, batch_size=self.batch_size)
        finally:
            model.train(was_training)
        self.outputs = [cut_at(t, self.task.stop) for t in texts]
        return {**generation_scores(self.outputs, self.dev.references), **out}
