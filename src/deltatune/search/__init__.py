"""Automatic delta configuration search (AutoPEFT-style): ``from deltatune.search import search``.

``search(task, time_budget=60, space=["lora:r=2|4|8", "ia3"], max_percent=1.0)`` returns a
``SearchResult`` whose ``spec`` / ``configs`` are ordinary deltas (saved and loaded like any
other); ``deltatune search`` is the command line. Needs optuna (the ``search`` extra).
"""
from __future__ import annotations

from .run import RESULT_FILE, SearchResult, carve_dev, search
from .space import DEFAULT_SPACE, Candidate, parse_candidate, parse_space, spec_of

__all__ = ["DEFAULT_SPACE", "RESULT_FILE", "Candidate", "SearchResult", "carve_dev", "parse_candidate",
           "parse_space", "search", "spec_of"]
