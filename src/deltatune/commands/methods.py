"""`deltatune methods`: the registered methods, their family, paper and config fields."""
from __future__ import annotations

import dataclasses


def add_parser(sub) -> None:
    p = sub.add_parser("methods", help="list the registered delta-tuning methods")
    p.add_argument("--fields", action="store_true", help="also print each config's fields and defaults")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..core.registry import method_specs

    for spec in method_specs():
        print(f"{spec.name:16s} {spec.family:16s} {spec.config_cls.__name__:22s} {spec.paper}")
        if args.fields:
            for f in dataclasses.fields(spec.config_cls):
                default = f.default if f.default is not dataclasses.MISSING else "[]"
                print(f"    {f.name} = {default!r}")
    return 0
