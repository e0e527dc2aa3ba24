"""Training memory of LoRA-FA against LoRA on the shipped MiniLM, same batch, same step.

    python benchmarks/lora_fa_memory.py                          # every config, each in a fresh process
    python benchmarks/lora_fa_memory.py one --config lora_fa-qv  # one config in this process (JSON line)

Two readings per config (r = 8, alpha = 16, no dropout):
- the activation bytes autograd keeps for backward in one training step: the distinct storages
  that ``saved_tensors_hooks`` sees, minus the model's and the delta's own tensors (the weights are
  kept anyway). Exact and repeatable; LoRA-FA's point is here: LoRA keeps each adapted module's
  d_in-wide input for A's gradient, LoRA-FA only A x (r wide);
- the peak resident memory of the process over the training steps, above what it held before the
  first one (sampled every 10 ms by the bench's PeakMemory; noisy on a shared machine).
Targets: query + value ("qv", the LoRA paper's) and every Linear of the encoder ("all": query, key,
value and the three dense layers, where the feed-forward's 4x-wide input is the big one).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from common import memory_steps, minilm_batch, rows_in_fresh_processes, saved_bytes  # noqa: E402  (offline)

import torch  # noqa: E402

TARGETS = {"qv": ["query", "value"], "all": ["query", "key", "value", "dense"]}
CONFIGS = {f"{m}-{t}": {"method": m, "r": 8, "alpha": 16, "targets": TARGETS[t]}
           for t in TARGETS for m in ("lora", "lora_fa")}


def run_one(name: str, batch_size: int, seq: int, steps: int, threads: int) -> dict:
    import deltatune as dt
    from deltatune.models import load_classifier

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, _ = load_classifier(seed=0)
    batch = minilm_batch(model, batch_size, seq)
    dm = dt.wrap(model, CONFIGS[name])
    dm.train()
    saved = saved_bytes(dm, batch, skip_own=True)
    return {"config": name, "saved_mib": saved / 2**20, **memory_steps(dm, batch, steps), "batch": batch_size,
            "seq": seq}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", nargs="?", default="all", choices=("all", "one"))
    ap.add_argument("--config", default="lora_fa-qv", choices=list(CONFIGS))
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.mode == "one":
        print(json.dumps(run_one(a.config, a.batch, a.seq, a.steps, a.threads)))
        return
    rows = rows_in_fresh_processes(__file__, a.configs, ["--batch", str(a.batch), "--seq", str(a.seq),
                                                         "--steps", str(a.steps), "--threads", str(a.threads)])
    by = {r["config"]: r for r in rows}
    print(f"MiniLM (L6, H384), batch {a.batch} x {a.seq} tokens, r=8, {a.steps} AdamW steps, CPU\n")
    print("| config | trainable | autograd-saved activations (MiB) | vs LoRA | peak RSS growth over the steps (MiB) | step (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        method, targets = r["config"].split("-")
        ref = by.get(f"lora-{targets}")
        rel = f"{r['saved_mib'] - ref['saved_mib']:+.1f} MiB" if ref and method != "lora" else ""
        print(f"| {r['config']} | {r['trainable']:,} | {r['saved_mib']:.1f} | {rel} | {r['rss_growth_mib']:.0f} "
              f"| {r['step_s']:.2f} |")


if __name__ == "__main__":
    main()
