"""`deltatune bench`: methods x tasks x seeds against full fine-tuning (the quick suite by default)."""
from __future__ import annotations

from ..bench.loop import Budget
from ._common import add_budget_args, add_model_args, suite_kwargs

EPILOG = """\
methods: NAME[:key=value,...] with the method's config fields and lr, e.g. lora:r=16,alpha=32,lr=1e-3;
  join with + to train several deltas together, e.g. lora+bitfit; `full` is full fine-tuning.
tasks: CoLA SST-2 MRPC RTE STS-B WNLI, or a file dataset:
  NAME:train=FILE,dev=FILE,text=COLUMN[,text_pair=COLUMN],label=COLUMN[,labels=a|b][,regression=true]
Without arguments: the shipped MiniLM on SST-2 and RTE, full fine-tuning plus every registered
method (and the default combinations), one seed, a fixed budget per run (see --list).
An interrupted run resumes in the same --out directory: finished runs are not repeated."""


def add_parser(sub) -> None:
    import argparse

    p = sub.add_parser("bench", help="benchmark delta-tuning methods against full fine-tuning",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK", help="default: SST-2 RTE")
    p.add_argument("--methods", nargs="+", default=None, metavar="SPEC",
                   help="default: full + every registered method + default combinations")
    p.add_argument("--exclude", nargs="+", default=[], metavar="SPEC", help="drop these from the method list")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="SEED")
    p.add_argument("--out", default="bench-out", help="output directory (default %(default)s)")
    p.add_argument("--fresh", action="store_true", help="re-run every cell even if results exist")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--list", action="store_true", help="print the tasks, methods, learning rates and budget, then exit")
    add_model_args(p)
    add_budget_args(p, Budget())
    p.set_defaults(func=run)


def run(args) -> int:
    from ..bench.methods import default_methods
    from ..bench.suite import DEFAULT_TASKS, SuiteConfig, run_suite

    methods = [m for m in (args.methods or default_methods()) if m not in args.exclude]
    tasks = args.tasks or list(DEFAULT_TASKS)
    cfg = SuiteConfig(tasks=tasks, methods=methods, seeds=args.seeds, out=args.out, resume=not args.fresh,
                      plots=not args.no_plots, **suite_kwargs(args))
    if args.list:
        return show(cfg)
    records = run_suite(cfg)
    failed = [r for r in records if r.get("status") != "ok"]
    if not args.quiet:
        print(open(f"{args.out}/summary.md", encoding="utf-8").read())
    return 1 if records and len(failed) == len(records) else 0


def show(cfg) -> int:
    from ..bench.methods import parse_method
    from ..bench.tasks import parse_task

    for t in map(parse_task, cfg.tasks):
        print(f"task   {t.name:10s} metric {t.metric:9s} labels {t.num_labels}  {t.source}")
    for m in map(parse_method, cfg.methods):
        lrs = ", ".join(f"{c.method} lr {(c.learning_rate if cfg.lr is None else cfg.lr):g}" for c in m.components)
        print(f"method {m.label:24s} {lrs}")
    b = cfg.budget
    print(f"budget {b.steps} steps x batch {b.batch_size}, dev subset {b.dev_size or 'all'}, scored every "
          f"{b.eval_every} steps, max length {b.max_length}; {len(cfg.seeds)} seed(s)")
    return 0
