"""`deltatune generate PATH`: completions of a trained delta (or model) for prompts, to try it out."""
from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate completions with a delta trained on a generation task")
    p.add_argument("path", help="a directory written by `deltatune train` on a causal-LM or seq2seq task")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="a prompt (repeatable); without it, prompts are read from stdin, one per line")
    p.add_argument("--model", default=None, help="the base model (default: the one it was trained on)")
    p.add_argument("--task", default=None, help="the task whose prompt template applies (default: as trained)")
    p.add_argument("--raw", action="store_true", help="give the prompts to the model as they are (no template)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--num-beams", type=int, default=1, help="1: greedy (default)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.set_defaults(func=run)


def run(args) -> int:
    from ..bench.single import generate_saved
    from ..errors import ConfigError

    prompts = args.prompt if args.prompt else [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise ConfigError("no prompts: pass --prompt TEXT or write prompts to stdin, one per line.")
    outs = generate_saved(args.path, prompts, args.model, args.max_new_tokens, args.num_beams, args.raw,
                          args.task, args.device)
    for text in outs:
        print(text.replace("\n", "\\n"))
    return 0
