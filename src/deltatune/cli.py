"""The `deltatune` command line. Each sub-command lives in deltatune/commands/<name>.py and
defines ``add_parser(subparsers)``; this file finds them, so new commands need no edit here."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys


def build_parser() -> argparse.ArgumentParser:
    from . import commands
    from .version import __version__

    parser = argparse.ArgumentParser(prog="deltatune", description="Delta-tuning of pretrained transformers.")
    parser.add_argument("--version", action="version", version=f"deltatune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{commands.__name__}.{info.name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("torchao").setLevel(logging.ERROR)  # optional kernels it cannot load here
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .errors import DeltaError

    try:
        return int(args.func(args) or 0)
    except DeltaError as e:
        if args.debug:
            raise
        print(f"deltatune: error: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError, RuntimeError, KeyError, IndexError) as e:  # not ours: say so, in one line
        if args.debug:
            raise
        print(f"deltatune: error: {type(e).__name__}: {e} (an unexpected failure: run with --debug for "
              f"the traceback, and report it if the message does not tell the fix)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
