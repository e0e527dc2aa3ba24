"""QA-LoRA vs LoRA on a group-wise INT4 base: what merging costs. Both train the same steps on SST-2
on the shipped MiniLM quantized to INT4 (group 32); then each is merged the only way it can be:
QA-LoRA into the zero points (the model stays INT4, no requantization), LoRA by dequantize -> merge
-> requantize to INT4 (``deltatune.merge_quantized(dm, requantize=True)``).

    python benchmarks/qalora_merge.py --steps 60 [--group 32] [--bits 4]

Prints one JSON line per method: dev accuracy (200 SST-2 dev examples) unmerged and merged, the
relative logit error of the merged model (||merged - unmerged|| / ||unmerged|| over the dev logits)
and the largest absolute logit difference.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import common  # noqa: E402,F401  (offline, quiet torchao)

import torch  # noqa: E402


def dev_logits(dm, dev) -> torch.Tensor:
    dm.eval()
    with torch.no_grad():
        return torch.cat([dm(**{k: v for k, v in b.items() if k != "labels"}).logits for b in dev])


def run(config: dict, args, train, dev, gold) -> dict:
    import deltatune as dt
    from deltatune.models import load_classifier

    torch.manual_seed(0)
    model, _ = load_classifier(seed=0)
    dt.quantize(model, f"int{args.bits}", group_size=args.group)
    dm = dt.wrap(model, config)
    opt = torch.optim.AdamW(dm.trainable_parameters(), lr=args.lr)
    dm.train()
    for i, b in enumerate(train):
        dm(**b).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dm.step(i)
    unmerged = dev_logits(dm, dev)
    if config["method"] == "qalora":
        dm.merge()  # into the zero points: stays INT
        how = "merge() into the INT zero points"
    else:
        report = dt.merge_quantized(dm, requantize=True)
        how = f"merge_quantized(requantize=True), weight rel. error {report.rel_error:.4f}"
    merged = dev_logits(dm, dev)
    kinds = {type(m.weight).__name__ for m in model.modules() if hasattr(m, "weight") and
             type(getattr(m, "weight", None)).__name__ == "GroupQuantTensor"}
    return {
        "method": config["method"], "bits": args.bits, "group": args.group, "steps": args.steps,
        "merge": how, "base_after_merge": sorted(kinds),
        "acc_unmerged": float((unmerged.argmax(-1) == gold).float().mean()),
        "acc_merged": float((merged.argmax(-1) == gold).float().mean()),
        "rel_logit_error": float((merged - unmerged).norm() / unmerged.norm()),
        "max_abs_logit_error": float((merged - unmerged).abs().max()),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--bits", type=int, default=4, choices=[2, 4, 8])
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from realrun import batches

    train = list(batches("train", args.steps * 16, 16, 0))
    dev = list(batches("dev", 200, 64, 0))
    gold = torch.cat([b["labels"] for b in dev])
    for config in ({"method": "qalora", "r": 8, "alpha": 16, "targets": ["query", "value"]},
                   {"method": "lora", "r": 8, "alpha": 16, "targets": ["query", "value"]}):
        print(json.dumps(run(config, args, train, dev, gold)), flush=True)


if __name__ == "__main__":
    main()
