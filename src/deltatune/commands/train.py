"""`deltatune train`: one method on one task; saves the delta (or the model, for `full`)."""
from __future__ import annotations

import json
import sys

from ..bench.loop import Budget
from ._common import add_budget_args, add_model_args, suite_kwargs


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train one method on one task and save the delta")
    p.add_argument("--task", required=True, help="a task name (SST-2, RTE, ...) or a file dataset spec")
    p.add_argument("--method", required=True, help="e.g. lora:r=16,alpha=32 or lora+bitfit or full")
    p.add_argument("--out", required=True, help="directory to save the delta and train_result.json into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the run's record as JSON")
    p.add_argument("--checkpoint-every", type=int, default=100, metavar="N",
                   help="checkpoint into OUT/checkpoint every N steps (0: never); running the same "
                        "command again resumes from it (default %(default)s)")
    p.add_argument("--restart", action="store_true", help="ignore a checkpoint in OUT and train from the start")
    p.add_argument("--stop-after", type=int, default=None, metavar="K",
                   help="stop after K steps as if killed (to test resuming)")
    add_model_args(p)
    add_budget_args(p, Budget(steps=300, eval_every=50, dev_size=0))
    p.set_defaults(func=run)


def run(args) -> int:
    from ..bench.checkpoint import TrainingStopped
    from ..bench.single import train_one
    from ..bench.suite import SuiteConfig

    cfg = SuiteConfig(**suite_kwargs(args))
    try:
        rec = train_one(cfg, args.task, args.method, args.seed, args.out, args.checkpoint_every,
                        args.restart, args.stop_after)
    except TrainingStopped as e:
        print(f"deltatune: {e}; run the same command again to resume.", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(rec, indent=2, sort_keys=True))
        return 0
    from ..bench.metrics import format_scores

    eff = rec["efficiency"]
    print(f"{rec['method']} on {rec['task']}: {format_scores(rec['metrics'])} (dev; scores x100); best "
          f"{rec['metric_name']} {100 * rec['convergence']['best']:.2f} at step {rec['convergence']['best_step']}")
    for split, notes in rec.get("data", {}).items():
        for k, v in notes.items():
            print(f"note: {split}: {v} {k.replace('_', ' ')}")
    print(f"{eff['trainable']:,} trainable parameters ({eff['trainable_percent']:.3g}%), "
          f"{1000 * eff['step_time_median']:.0f} ms/step; saved ({rec['saved']}) to {args.out}")
    return 0
