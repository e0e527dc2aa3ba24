"""Named suites (``deltatune bench --suite NAME``): tasks, methods, seeds and budget chosen
together, because a result is only as good as the budget it was run at.

- ``quick`` (the default): the four methods the papers use as representatives next to full
  fine-tuning, on SST-2, 3 seeds, a budget meant to take every one of them past the majority
  class within 10 minutes on 2 CPU cores. Prefix tuning runs without its MLP (prefixes
  initialised from real tokens' keys and values, the paper's other option): with the MLP, at
  lr 1e-2 or 1e-3, one of three seeds was still at the majority class after 150 steps; without
  it every seed left it (68-74% here). The summary marks a run that has not with †. It ranks
  early learning on one task; it does not show where methods plateau.
- ``paper``: every registered method on 4 GLUE tasks, 3 seeds, at a budget where full
  fine-tuning and LoRA have plateaued on this model (hours on a CPU: run it in the background;
  it resumes where it stopped).
- ``combos``: adapter, BitFit, prompt tuning and all their combinations (Ding et al. 2023,
  Table 2) on the same tasks and budget as ``paper``.
- ``nlg``: E2E data-to-text on SmolLM2-135M, 3 seeds.

A suite only sets defaults: ``--tasks``, ``--methods``, ``--seeds`` and every budget flag given
on the command line override it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigError
from .loop import Budget


@dataclass(frozen=True)
class Suite:
    name: str
    about: str
    tasks: tuple[str, ...]
    methods: Callable[[], list[str]]  # a function: the registry is read when the suite is used
    seeds: tuple[int, ...]
    budget: Budget
    model: str | None = None  # None: the shipped MiniLM
    time: str = ""  # the wall time to expect, as measured


# the methods the delta-tuning papers compare with full fine-tuning (Ding et al. 2023)
REPRESENTATIVE = ("lora", "adapter", "prefix", "prompt")


def registry_methods() -> list[str]:
    """``full`` plus every registered method that trains on its own (not `fusion`), without the
    default combinations: the paper suite's every-method table, the papers' four first (a suite
    stopped part-way has their rows whole)."""
    from .methods import FULL, default_methods

    rest = [m for m in default_methods() if m != FULL and "+" not in m]
    first = [m for m in REPRESENTATIVE if m in rest]  # the papers' comparison runs first
    return [FULL, *first, *(m for m in rest if m not in first)]


def combo_methods() -> list[str]:
    """Adapter, BitFit, prompt and every combination; the first component trains the task
    head, so prompt tuning (which has no head of its own to train well) always comes last."""
    from itertools import combinations

    parts = ("adapter", "bitfit", "prompt")
    return ["+".join(c) for k in (1, 2, 3) for c in combinations(parts, k)]


def _fixed(*methods: str) -> Callable[[], list[str]]:
    return lambda: list(methods)


# STS-B, not RTE: on MiniLM every method sits within noise of chance on RTE (277 dev examples),
# and RTE's pairs are the longest (the most expensive steps) of GLUE's small tasks.
GLUE4 = ("SST-2", "MRPC", "CoLA", "STS-B")
PAPER_BUDGET = Budget(steps=800, batch_size=16, eval_every=100, dev_size=0, max_length=128)

SUITES: dict[str, Suite] = {s.name: s for s in (
    Suite("quick", "full fine-tuning + LoRA, adapter, prefix, prompt on SST-2 (the default)",
          ("SST-2",), _fixed("full", "lora", "adapter", "prefix:projection=false", "prompt"), (0, 1, 2),
          Budget(steps=140, batch_size=16, eval_every=50, dev_size=256, max_length=64),
          time="9 min 16 s measured on 2 quiet CPU cores"),
    Suite("paper", "every registered method + full fine-tuning on 4 GLUE tasks",
          GLUE4, registry_methods, (0, 1, 2), PAPER_BUDGET, time="about 15-20 hours on 2 CPU cores (estimated from step times)"),
    Suite("combos", "adapter, BitFit, prompt and all their combinations (Ding et al. 2023, Table 2)",
          GLUE4, combo_methods, (0, 1, 2), PAPER_BUDGET, time="about 5 hours on 2 CPU cores (estimated)"),
    Suite("nlg", "E2E NLG on SmolLM2-135M: full fine-tuning + LoRA, adapter, prefix, prompt",
          ("e2e",), _fixed("full", "lora", "adapter", "prefix:lr=1e-3", "prompt"), (0, 1, 2),
          Budget(steps=60, batch_size=8, eval_every=20, dev_size=48, max_length=128, max_new_tokens=40),
          model="smollm2", time="about 3 hours on 2 CPU cores (estimated)"),
)}
DEFAULT = "quick"


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise ConfigError(f"unknown suite {name!r}: use one of {', '.join(SUITES)}.")
    return SUITES[name]


def describe(s: Suite) -> list[str]:
    """The lines ``deltatune bench --list`` prints for a suite."""
    b = s.budget
    methods = s.methods()
    shown = ", ".join(methods) if len(methods) <= 8 else f"{len(methods)} methods ({', '.join(methods[:4])}, ...)"
    return [f"suite  {s.name:7s} {s.about}",
            f"       model {s.model or 'MiniLM (shipped)'}; tasks {' '.join(s.tasks)}; seeds {' '.join(map(str, s.seeds))}",
            f"       methods {shown}",
            f"       budget {b.steps} steps x batch {b.batch_size}, dev {b.dev_size or 'all'}, scored every "
            f"{b.eval_every} steps, max length {b.max_length}; {len(methods) * len(s.tasks) * len(s.seeds)} runs, "
            f"{s.time}"]

