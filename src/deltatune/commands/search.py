"""`deltatune search`: find which methods, sizes and layers to train under a parameter budget."""
from __future__ import annotations

import json

EPILOG = """\
space: candidates written like --methods specs, one field listing sizes with |, e.g.
  lora:r=2|4|8 adapter:reduction_factor=8|16|32 ia3   (the default)
  Each layer gets, per candidate, one of its sizes or nothing; the result is a normal method spec
  (e.g. lora:r=8,layers=[0,2]+ia3:layers=[1]) that `deltatune train --method` accepts.
Trials are scored on a dev split carved from train (--search-dev-size examples); weak trials are
stopped early by successive halving; the search stops at --time-budget seconds (setup included).
The best trial's trained deltas are saved to --out: `deltatune eval OUT` scores them on dev."""


def add_parser(sub) -> None:
    import argparse

    from ._common import add_model_args, positive_float

    p = sub.add_parser("search", help="search methods x sizes x layers under a parameter budget",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="SST-2", help="a task name or a file dataset spec (default %(default)s)")
    p.add_argument("--space", nargs="+", default=None, metavar="CANDIDATE", help="default: see below")
    p.add_argument("--time-budget", type=float, default=60.0, help="seconds for the whole search (default %(default)s)")
    p.add_argument("--max-params", type=int, default=None, help="trainable parameters allowed (with the head)")
    p.add_argument("--max-percent", type=float, default=None, help="trainable parameters allowed, %% of the base")
    p.add_argument("--trials", type=int, default=None, help="stop after this many trials")
    p.add_argument("--eta", type=int, default=3, help="successive halving's reduction factor (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="save the best trial's deltas and search_result.json here")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    g = p.add_argument_group("per trial")
    g.add_argument("--steps", type=int, default=30, help="optimizer steps of a full trial (default %(default)s)")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--eval-every", type=int, default=10, help="dev scores (the fidelities) every N steps")
    g.add_argument("--search-dev-size", type=int, default=200, help="dev examples carved from train")
    g.add_argument("--max-length", type=int, default=128)
    g.add_argument("--lr", type=positive_float, default=None, help="one learning rate for every delta (default: per method)")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from ..search import search

    log = None if args.quiet else (lambda msg: print(f"[deltatune search] {msg}", file=sys.stderr))
    res = search(task=args.task, model=args.model, time_budget=args.time_budget, space=args.space,
                 max_params=args.max_params, max_percent=args.max_percent, steps=args.steps,
                 batch_size=args.batch_size, eval_every=args.eval_every, dev_size=args.search_dev_size,
                 max_length=args.max_length, seed=args.seed, n_trials=args.trials, eta=args.eta,
                 data_dir=args.data_dir, device=args.device, threads=args.threads, lr=args.lr, out=args.out, log=log)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2, sort_keys=True))
        return 0
    done = sum(t.get("status") == "complete" for t in res.trials)
    print(f"best of {len(res.trials)} trials ({done} trained to the end) in {res.elapsed:.1f} s: "
          f"{res.metric} {100 * res.score:.2f} (search dev, x100), {res.trainable:,} trainable")
    print(f"method: {res.spec}")
    if args.out:
        print(f"saved to {args.out} (deltatune eval {args.out} scores it on the task's dev split)")
    return 0
