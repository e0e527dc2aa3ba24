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
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

CONFIGS = {
    "lora": {"method": "lora", "r": 8},
    "lst": {"method": "lst", "reduction_factor": 8},
    "full": None,
}


def saved_bytes(model, batch) -> int:
    """Bytes of the distinct tensors autograd keeps for backward in one forward pass."""
    import torch

    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch).loss.backward()
    return sum(seen.values())


def run_one(name: str, batch_size: int, seq: int, steps: int, threads: int) -> dict:
    import torch

    import deltatune as dt
    from deltatune.bench.measure import PeakMemory
    from deltatune.models import load_classifier

    torch.set_num_threads(threads)
    model, _ = load_classifier(seed=0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, model.config.vocab_size, (batch_size, seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.randint(0, 2, (batch_size,), generator=g)}
    net = model if CONFIGS[name] is None else dt.wrap(model, CONFIGS[name])
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    net.train()
    saved = saved_bytes(net, batch)
    opt.zero_grad(set_to_none=True)
    times = []
    with PeakMemory(torch.device("cpu")) as mem:
        for _ in range(steps):
            t0 = time.perf_counter()
            net(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
    return {"config": name, "trainable": sum(p.numel() for p in params), "saved_mib": saved / 2**20,
            "rss_growth_mib": mem.peak_mb - mem.start_mb, "rss_peak_mib": mem.peak_mb,
            "step_s": sorted(times)[len(times) // 2], "batch": batch_size, "seq": seq}


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
    rows = []
    for name in a.configs:  # a fresh process each: peak memory is per process
        cmd = [sys.executable, __file__, "one", "--config", name, "--batch", str(a.batch), "--seq", str(a.seq),
               "--steps", str(a.steps), "--threads", str(a.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"MiniLM (L6, H384), batch {a.batch} x {a.seq} tokens, {a.steps} AdamW steps, CPU\n")
    print("| config | trainable | autograd-saved activations (MiB) | RSS growth over the steps (MiB) | step (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['trainable']:,} | {r['saved_mib']:.1f} | {r['rss_growth_mib']:.0f} | {r['step_s']:.2f} |")


if __name__ == "__main__":
    main()
