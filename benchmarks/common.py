"""Shared pieces of the benchmarks: models of the issue's sizes, batches, memory readings."""
from __future__ import annotations

import logging
import os
import resource

os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.getLogger("torchao").setLevel(logging.ERROR)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402


def build_model(name: str, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(model, one batch) for a named benchmark model; random init except the shipped MiniLM."""
    import transformers as tf

    torch.manual_seed(seed)
    if name == "bert-base":  # BERT-base width; layers from BENCH_LAYERS (default 4, as the orientation run)
        layers = int(os.environ.get("BENCH_LAYERS", "4"))
        cfg = tf.BertConfig(num_hidden_layers=layers, num_labels=2)
        model, batch, seq, vocab = tf.BertForSequenceClassification(cfg), 8, 128, cfg.vocab_size
    elif name == "llama-100m":
        cfg = tf.LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                             num_attention_heads=12, num_key_value_heads=12, vocab_size=32000,
                             max_position_embeddings=512)
        model, batch, seq, vocab = tf.LlamaForCausalLM(cfg), 4, 256, cfg.vocab_size
    elif name == "minilm":
        from deltatune.models import load_classifier

        model, _ = load_classifier()
        batch, seq, vocab = 32, 64, model.config.vocab_size
    else:
        raise ValueError(name)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    inputs["labels"] = ids.clone() if name == "llama-100m" else torch.randint(0, 2, (batch,), generator=g)
    return model, inputs


def rss_peak_mib() -> float:
    """Lifetime peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_now_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
