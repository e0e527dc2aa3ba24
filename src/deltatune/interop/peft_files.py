"""The files of a peft adapter directory: ``adapter_config.json`` and ``adapter_model.safetensors``
(or the older ``adapter_model.bin``, read only through ``torch.load(weights_only=True)``).

peft needs those two fixed names, so a save cannot name files by their hash (as deltatune's own
format does, core/savedir.py) and two renames are never one atomic step. A save is therefore
all-or-nothing through a small journal: every new file (of every adapter of the save) is first
written beside its final name as a hidden temporary (``.adapter_config.json.<random>``), then the
journal naming those temporaries is renamed into place: the commit. Only then are they renamed
onto their fixed names, and the journal removed. A kill before the commit leaves the previous save
(and temporaries the next save removes); after it, whoever comes next (a save, or ``dt.load``)
finishes the renames first: the new save. Either way the directory loads as one whole save.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..core.state import atomic_write
from ..errors import CheckpointError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"
JOURNAL = ".deltatune-peft-commit.json"  # in the save's root while a committed save is finishing
# a temporary of a save: "[<adapter dir>/].<fixed name>.<random>", the adapter dir one plain name
_TEMP_RE = re.compile(r"(?:([A-Za-z0-9_\-]+)/)?\.(adapter_config\.json|adapter_model\.safetensors)\.[A-Za-z0-9_]+")
_JOURNAL_TEMP_RE = re.compile(r"\." + re.escape(JOURNAL) + r"\.[A-Za-z0-9_]+")  # atomic_write's, killed


def detect(root: Path) -> bool:
    """Whether `root` is a peft adapter directory (what ``deltatune.load`` asks every format)."""
    return (root / CONFIG_FILE).is_file() or (root / JOURNAL).is_file()


def _journal_temps(root: Path) -> list[str]:
    """The temporaries a committed save in `root` still has to rename ([] without a journal; a
    journal naming anything but a save's own temporaries is not ours to follow)."""
    try:
        data = json.loads((root / JOURNAL).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []
    temps = data.get("temps") if isinstance(data, dict) else None
    if not isinstance(temps, list) or not all(isinstance(t, str) and _TEMP_RE.fullmatch(t) for t in temps):
        return []
    return temps


def finish(root: Path) -> None:
    """Complete a save that committed in `root` (its journal) but was stopped before its renames:
    afterwards the fixed names hold that save, for peft too. Nothing to do without a journal."""
    if not (root / JOURNAL).exists():
        return
    for temp in _journal_temps(root):
        m = _TEMP_RE.fullmatch(temp)
        final = root / (m.group(1) or "") / m.group(2)
        try:
            os.replace(root / temp, final)
        except FileNotFoundError:
            pass  # renamed already (the kill came later, or another process finished it)
    (root / JOURNAL).unlink(missing_ok=True)


def remove_temps(root: Path) -> None:
    """Delete temporaries that no committed save names (a save killed before its commit)."""
    for d in [root, *(p for p in root.iterdir() if p.is_dir())] if root.is_dir() else []:
        for f in d.iterdir():
            rel = f.relative_to(root).as_posix()
            if f.is_file() and (_TEMP_RE.fullmatch(rel) or _JOURNAL_TEMP_RE.fullmatch(rel)):
                f.unlink(missing_ok=True)


def read_config(root: Path) -> dict[str, Any]:
    try:
        data = json.loads((root / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{root / CONFIG_FILE} is not a readable JSON file ({e}).") from e
    if not isinstance(data, dict) or not isinstance(data.get("peft_type"), str):
        raise CheckpointError(f"{root / CONFIG_FILE} has no 'peft_type': not a peft adapter config.")
    return data


def read_weights(root: Path) -> dict[str, torch.Tensor]:
    if (root / WEIGHTS_FILE).exists():
        try:
            return st_load((root / WEIGHTS_FILE).read_bytes())
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{root / WEIGHTS_FILE} is not a valid safetensors file ({e}).") from e
    if not (root / WEIGHTS_BIN).exists():
        raise CheckpointError(f"{root} holds {CONFIG_FILE} but neither {WEIGHTS_FILE} nor {WEIGHTS_BIN}.")
    try:
        data = torch.load(root / WEIGHTS_BIN, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{root / WEIGHTS_BIN} cannot be read as plain tensors (weights-only "
                              f"load refused it: {str(e).splitlines()[0]}).") from e
    if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise CheckpointError(f"{root / WEIGHTS_BIN} is not a dict of named tensors.")
    return data


def write_adapters(root: Path, adapters: dict[str, tuple[dict[str, Any], dict[str, torch.Tensor]]]) -> None:
    """Save each adapter (by its directory under `root`: "" is `root` itself) all-or-nothing."""
    root.mkdir(parents=True, exist_ok=True)
    finish(root)
    remove_temps(root)
    temps = []
    for sub, (config, tensors) in adapters.items():
        temps.append(_stage(root, sub, WEIGHTS_FILE, st_save(tensors, metadata={"format": "pt"})))
        temps.append(_stage(root, sub, CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True).encode()))
    atomic_write(root / JOURNAL, json.dumps({"format": "deltatune-peft-commit", "temps": temps}).encode())
    finish(root)  # the renames, then the journal goes


def _stage(root: Path, sub: str, name: str, data: bytes) -> str:
    """Write `data` durably as a temporary beside ``root/sub/name``; its path relative to `root`."""
    d = root / sub
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=d)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return Path(tmp).relative_to(root).as_posix()
