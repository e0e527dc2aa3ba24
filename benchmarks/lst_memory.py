"""Training memory of LST against LoRA (and full fine-tuning) on the shipped MiniLM, same batch.

    python benchmarks/lst_memory.py                       # every config, each in a fresh process
    python benchmarks/lst_memory.py one --config lst      # one config in this process (JSON line)

Two readings per config: the bytes autograd saves for backward in one training forward (exact,
counted by ``saved_tensors_hooks``: the activation memory a method costs), and the growth of the
process's resident memory over a few training steps above what it held before the first step
(sampled every 10 ms; noisy on a shared machine). LST's point is the first: no backward through
the backbone, so the backbone's activations are not kept.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from common import memory_steps, minilm_batch, rows_in_fresh_processes, saved_bytes  # noqa: E402  (offline)

import torch  # noqa: E402

CONFIGS = {
    "lora": {"method": "lora", "r": 8},
    "lst": {"method": "lst", "reduction_factor": 8},
    "full": None,
}


def run_one(name: str, batch_size: int, seq: int, steps: int, threads: int) -> dict:
    import deltatune as dt
    from deltatune.models import load_classifier

    torch.set_num_threads(threads)
    model, _ = load_classifier(seed=0)
    batch = minilm_batch(model, batch_size, seq)
    net = model if CONFIGS[name] is None else dt.wrap(model, CONFIGS[name])
    net.train()
    saved = saved_bytes(net, batch)
    return {"config": name, "saved_mib": saved / 2**20, **memory_steps(net, batch, steps), "batch": batch_size,
            "seq": seq}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", nargs="?", default="all", choices=("all", "one"))
    ap.add_argument("--config", default="lst", choices=list(CONFIGS))
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.mode == "one":
        print(json.dumps(run_one(a.config, a.batch, a.seq, a.steps, a.threads)))
        return
    rows = rows_in_fresh_processes(__file__, a.configs, ["--batch", str(a.batch), "--seq", str(a.seq),
                                                         "--steps", str(a.steps), "--threads", str(a.threads)])
    print(f"MiniLM (L6, H384), batch {a.batch} x {a.seq} tokens, {a.steps} AdamW steps, CPU\n")
    print("| config | trainable | autograd-saved activations (MiB) | RSS growth over the steps (MiB) | step (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['trainable']:,} | {r['saved_mib']:.1f} | {r['rss_growth_mib']:.0f} | {r['step_s']:.2f} |")


if __name__ == "__main__":
    main()
