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


def minilm_batch(model: nn.Module, batch_size: int, seq: int) -> dict[str, torch.Tensor]:
    """A fixed random classification batch for the memory benchmarks (same one for every config)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, model.config.vocab_size, (batch_size, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, 2, (batch_size,), generator=g)}


def saved_bytes(model: nn.Module, batch: dict, skip_own: bool = False) -> int:
    """Bytes of the distinct storages autograd keeps for backward in one training forward (exact:
    counted by ``saved_tensors_hooks``); ``skip_own`` leaves out the model's parameters and buffers,
    which are kept anyway, so what remains is the activation memory a method costs."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]} if skip_own else set()
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    return sum(seen.values())


def memory_steps(net: nn.Module, batch: dict, steps: int) -> dict[str, float]:
    """Peak RSS and median time of `steps` AdamW training steps on one batch (after one counted
    forward/backward for ``saved_bytes`` by the caller; gradients cleared first)."""
    import time

    from deltatune.bench.measure import PeakMemory

    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    opt.zero_grad(set_to_none=True)
    times = []
    with PeakMemory(torch.device("cpu")) as mem:
        for _ in range(steps):
            t0 = time.perf_counter()
            net(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
    return {"trainable": sum(p.numel() for p in params), "rss_growth_mib": mem.peak_mb - mem.start_mb,
            "rss_peak_mib": mem.peak_mb, "step_s": sorted(times)[len(times) // 2]}


def rows_in_fresh_processes(script: str, configs: list[str], args: list[str]) -> list[dict]:
    """Run `script one --config C <args>` per config, each in a fresh process (peak memory is per
    process), and read the JSON line each prints last."""
    import json
    import subprocess
    import sys

    rows = []
    for name in configs:
        out = subprocess.run([sys.executable, script, "one", "--config", name, *args],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows
