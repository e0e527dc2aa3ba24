"""`deltatune bench`: methods x tasks x seeds against full fine-tuning (the quick suite by default)."""
from __future__ import annotations

import re
import time
from dataclasses import asdict

from ..bench.loop import Budget
from ._common import add_budget_args, add_model_args, suite_kwargs

EPILOG = """\
suites (--suite, default quick; --list prints each with its budget): quick, paper, combos, nlg.
  A suite sets tasks, methods, seeds, model and budget; any of those given here overrides it.
methods: NAME[:key=value,...] with the method's config fields and lr, e.g. lora:r=16,alpha=32,lr=1e-3;
  join with + to train several deltas together, e.g. lora+bitfit; `full` is full fine-tuning;
  `all`: full + every registered method + the default combinations.
tasks: CoLA SST-2 MRPC RTE STS-B WNLI e2e, or a file dataset:
  NAME:train=FILE,dev=FILE,text=COLUMN[,text_pair=COLUMN],label=COLUMN[,labels=a|b][,regression=true]
An interrupted run resumes in the same --out directory: finished runs are not repeated."""

# budget flags whose value, when not given, comes from the suite (argparse default None)
BUDGET_FLAGS = ("steps", "batch_size", "eval_every", "dev_size", "max_length", "weight_decay", "warmup",
                "max_new_tokens", "num_beams", "loss_on_prompt", "pack")


def add_parser(sub) -> None:
    import argparse

    from ..bench.suites import DEFAULT, SUITES

    p = sub.add_parser("bench", help="benchmark delta-tuning methods against full fine-tuning",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default=DEFAULT, choices=list(SUITES), help="default: %(default)s")
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK", help="default: the suite's")
    p.add_argument("--methods", nargs="+", default=None, metavar="SPEC",
                   help="default: the suite's; `all`: full + every registered method + default combinations")
    p.add_argument("--exclude", nargs="+", default=[], metavar="SPEC", help="drop these from the method list")
    p.add_argument("--seeds", nargs="+", type=int, default=None, metavar="SEED", help="default: the suite's")
    p.add_argument("--out", default="bench-out", help="output directory (default %(default)s)")
    p.add_argument("--fresh", action="store_true", help="re-run every cell even if results exist")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--report", action="store_true",
                   help="train nothing: write summary.md and the plots from the runs already in --out "
                        "(a partial suite says how many of its runs are done)")
    p.add_argument("--list", action="store_true",
                   help="print every suite with its budget, then the selected run's tasks, methods and "
                        "learning rates, and exit")
    add_model_args(p)
    add_budget_args(p, Budget())
    p.set_defaults(func=run, **{k: None for k in BUDGET_FLAGS})
    for action in p._actions:  # their value comes from the suite: say so instead of Budget()'s
        if action.dest in BUDGET_FLAGS:
            action.help = re.sub(r"\(?default %\(default\)s\)?", "(default: the suite's)", action.help or "")


def resolve(args):
    """The run's SuiteConfig: the suite's choices, overridden by what the command line gives."""
    from ..bench.methods import default_methods
    from ..bench.suite import SuiteConfig
    from ..bench.suites import get_suite

    suite = get_suite(args.suite)
    methods = args.methods or suite.methods()
    if methods == ["all"]:
        methods = default_methods()
    methods = [m for m in methods if m not in args.exclude]
    given = {k: getattr(args, k) for k in BUDGET_FLAGS if getattr(args, k) is not None}
    budget = Budget(**{**asdict(suite.budget), **given})
    budget.eval_every = min(budget.eval_every, budget.steps)
    kw = suite_kwargs(_with_budget(args, budget))
    kw["model"] = args.model or suite.model
    return SuiteConfig(tasks=args.tasks or list(suite.tasks), methods=methods,
                       seeds=args.seeds or list(suite.seeds), out=args.out, resume=not args.fresh,
                       plots=not args.no_plots, train=not args.report, **kw)


def _with_budget(args, budget: Budget):
    """`args` with every budget flag filled from `budget` (what `suite_kwargs` reads)."""
    import argparse

    return argparse.Namespace(**{**vars(args), **asdict(budget)})


def run(args) -> int:
    from ..bench.suite import run_suite

    cfg = resolve(args)
    if args.list:
        return show(cfg)
    t0 = time.perf_counter()
    records = run_suite(cfg)
    wall = time.perf_counter() - t0
    failed = [r for r in records if r.get("status") != "ok"]
    if not args.quiet:
        print(open(f"{args.out}/summary.md", encoding="utf-8").read())
    if args.report:
        print(f"report of {len(records)} runs in {args.out}: {args.out}/summary.md")
        return 0
    print(f"wall time: {wall // 60:.0f} min {wall % 60:.0f} s ({len(records)} runs, suite {args.suite}, "
          f"results in {args.out})")
    return 1 if records and len(failed) == len(records) else 0


def show(cfg) -> int:
    from ..bench.methods import parse_method
    from ..bench.suites import SUITES, describe
    from ..bench.tasks import parse_task

    for s in SUITES.values():
        print("\n".join(describe(s)))
    print("\nthis run:")
    for t in map(parse_task, cfg.tasks):
        print(f"task   {t.name:10s} metric {t.metric:9s} labels {t.num_labels}  {t.source}")
    for m in map(parse_method, cfg.methods):
        lrs = ", ".join(f"{c.method} lr {(c.learning_rate if cfg.lr is None else cfg.lr):g}" for c in m.components)
        print(f"method {m.label:24s} {lrs}")
    b = cfg.budget
    print(f"budget {b.steps} steps x batch {b.batch_size}, dev subset {b.dev_size or 'all'}, scored every "
          f"{b.eval_every} steps, max length {b.max_length}; {len(cfg.seeds)} seed(s): "
          f"{' '.join(map(str, cfg.seeds))}; model {cfg.model or 'MiniLM (shipped)'}")
    return 0
