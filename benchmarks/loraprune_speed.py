"""LoRAPrune: inference time of the pruned model (heads and FFN channels sliced out) against the
unpruned base, on the shipped MiniLM; the pruning itself comes from a short LoRAPrune run on SST-2.

    python benchmarks/loraprune_speed.py --sparsity 0.5 --steps 40 [--device cuda]

Prints one JSON line: parameters, median forward time (eval, no grad; the two models' runs interleaved) of the
base and of the sliced model, the speed-up, and the largest logit difference between the masked (merged) model
and the sliced one (they are the same function).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import common  # noqa: E402,F401  (offline, quiet torchao)

import torch  # noqa: E402


def median_times(models, inputs, repeats: int, device: str) -> list[float]:
    """Median forward time of each model, runs interleaved (a loaded machine slows both alike)."""
    def once(model):
        t0 = time.perf_counter()
        with torch.no_grad():
            model(**inputs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for model in models:
        once(model)
        once(model)
    times = [[] for _ in models]
    for _ in range(repeats):
        for i, model in enumerate(models):
            times[i].append(once(model))
    return [statistics.median(t) for t in times]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import deltatune as dt
    from deltatune.methods.loraprune import LoRAPruneConfig, prune_model
    from deltatune.models import load_classifier
    from realrun import batches

    base, _ = load_classifier(seed=0)
    base.eval().to(args.device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, base.config.vocab_size, (args.batch, args.seq), generator=g).to(args.device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    n_base = sum(p.numel() for p in base.parameters())

    model, _ = load_classifier(seed=0)
    model.to(args.device)
    cfg = LoRAPruneConfig(r=8, total_step=args.steps, sparsity=args.sparsity, prune_every=5)
    dm = dt.wrap(model, cfg)
    opt = torch.optim.AdamW(dm.trainable_parameters(), lr=5e-3)
    dm.train()
    for i, b in enumerate(batches("train", args.steps * 16, 16, 0)):
        b = {k: v.to(args.device) for k, v in b.items()}
        dm(**b).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dm.step(i)
    dm.eval()
    pruned = dm.get_delta("default").pruned()
    with torch.no_grad():
        masked = dm(**inputs).logits
    small = prune_model(dm)
    with torch.no_grad():
        gap = float((small(**inputs).logits - masked).abs().max())
    n_small = sum(p.numel() for p in small.parameters())
    t_base, t_small = median_times([base, small], inputs, args.repeats, args.device)
    heads = [v["kept"] for v in pruned.values() if v["kind"] == "heads"]
    channels = [v["kept"] for v in pruned.values() if v["kind"] == "channels"]
    print(json.dumps({
        "model": "minilm", "device": args.device, "threads": torch.get_num_threads(), "batch": args.batch,
        "seq": args.seq, "sparsity": args.sparsity, "heads_kept_per_layer": heads,
        "channels_kept_per_layer": channels, "params_base": n_base, "params_pruned": n_small,
        "ms_base": round(1000 * t_base, 2), "ms_pruned": round(1000 * t_small, 2),
        "speedup": round(t_base / t_small, 3), "max_logit_gap_masked_vs_sliced": gap,
    }))


if __name__ == "__main__":
    main()
