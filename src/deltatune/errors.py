"""Error types. Every message names the problem and the fix."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class DeltaError(Exception):
    """Base class of every deltatune error."""


class ConfigError(DeltaError, ValueError):
    """A config value is invalid, unknown or missing."""


class TargetError(DeltaError, ValueError):
    """Targets match nothing, or match modules a method cannot handle."""


class CheckpointError(DeltaError, ValueError):
    """A saved delta is corrupt, from a newer version, or does not fit the model."""


class MergeError(DeltaError, RuntimeError):
    """A delta cannot be merged/unmerged in the requested way."""


class TrainingError(DeltaError, RuntimeError):
    """A training run cannot go on (a non-finite loss or gradient)."""


class DeltaNotFoundError(DeltaError, KeyError):
    """A delta name that the model does not hold."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


def close_matches(word: str, choices: Iterable[str], n: int = 5) -> list[str]:
    """Closest names to `word`, comparing both whole names and their last component."""
    choices = list(dict.fromkeys(choices))
    found = difflib.get_close_matches(word, choices, n=n, cutoff=0.5)
    if len(found) < n:
        tails = {c.rsplit(".", 1)[-1]: c for c in choices}
        for t in difflib.get_close_matches(word.rsplit(".", 1)[-1], list(tails), n=n, cutoff=0.6):
            if tails[t] not in found:
                found.append(tails[t])
    return found[:n]


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    found = close_matches(word, choices)
    return f" Did you mean: {', '.join(found)}?" if found else ""
