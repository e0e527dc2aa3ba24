"""`deltatune eval PATH`: score a saved delta (or a fully fine-tuned model) on a task's dev split."""
from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="score a saved delta on a task's dev split")
    p.add_argument("path", help="a directory written by `deltatune train` (or any saved delta)")
    p.add_argument("--task", default=None, help="default: the task it was trained on (train_result.json)")
    p.add_argument("--model", default=None, help="the base model (default: the one it was trained on)")
    p.add_argument("--dev-size", type=int, default=0,
                   help="a fixed random dev subset (generation tasks: of distinct inputs); 0 = all of dev")
    p.add_argument("--max-length", type=int, default=None, help="default: as trained")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation tasks (default: as trained)")
    p.add_argument("--num-beams", type=int, default=None, help="generation tasks; 1 = greedy (default: as trained)")
    p.add_argument("--predictions", default=None, metavar="FILE",
                   help="generation tasks: write each input, its generation and references (JSON lines)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..bench.single import eval_saved

    from ..bench.metrics import format_scores

    res = eval_saved(args.path, args.task, args.model, args.dev_size, args.max_length, args.batch_size,
                     args.device, args.mixed_precision, args.data_dir, args.max_new_tokens, args.num_beams,
                     args.predictions)
    if args.json:
        print(json.dumps(res, indent=2, sort_keys=True))
    else:
        what = "inputs" if "data" in res else "examples"
        print(f"{res['path']} on {res['task']} dev ({res['n']} {what}): {format_scores(res['metrics'])}")
        for k, v in res.get("data", {}).items():
            print(f"note: {v} {k.replace('_', ' ')}")
    return 0
