"""The Hugging Face checkpoint layout: every delta in one ``model.safetensors``, for Trainer.

``transformers.Trainer`` resumes a run (``resume_from_checkpoint``) and loads its best model
(``load_best_model_at_end``) by reading ``model.safetensors`` into ``model.load_state_dict(...,
strict=False)``. So ``save_pretrained`` (what Trainer calls for ``save_model`` and every checkpoint)
writes the deltas' tensors under the wrapper's own state-dict names (``delta_modules.<name>.<key>``),
as they are while training (a prompt encoder stays, nothing is folded: that is what a resume
needs), and the deltatune manifest (each delta's config, extra state and base fingerprint, which
are active) in the file's safetensors metadata. ``dt.load`` reads it like any deltatune save.

One file is the whole save, renamed into place: killed at any moment, the directory holds the
previous save or this one. A ``model.safetensors`` that deltatune did not write (a full model) is
never overwritten.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import CheckpointError, ConfigError
from ..version import FORMAT_VERSION, __version__
from .state import add_saved, atomic_write, fingerprint

WEIGHTS = "model.safetensors"  # the name Trainer resumes and loads the best model from
META_KEY = "deltatune"          # the safetensors metadata entry holding the manifest
PREFIX = "delta_modules"        # DeltaModel's ModuleDict of deltas: the state-dict name prefix


def manifest(root: Path) -> dict[str, Any] | None:
    """The manifest of the deltatune save in ``root/model.safetensors`` (None: no such file, or
    not ours). Reads the header only."""
    file = root / WEIGHTS
    if not file.is_file():
        return None
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
        data = json.loads(meta.get(META_KEY, "null"))
    except Exception:  # not a safetensors file, or a foreign header: not ours
        return None
    return data if isinstance(data, dict) and data.get("format") == "deltatune" else None


def _entry(dm, name: str) -> dict[str, Any]:
    delta = dm.get_delta(name)
    return {"config": delta.config.to_dict(), "extra_state": delta.state_extra(),
            "base": fingerprint(dm.model, delta.paths())}


def blob(dm, names: list[str]) -> bytes:
    """The one file: the deltas' tensors as the wrapper names them, the manifest in the header."""
    tensors = {f"{PREFIX}.{n}.{k}": v.detach().contiguous().cpu()
               for n in names for k, v in dm.get_delta(n).state_dict().items()}
    data: dict[str, Any] = {"format": "deltatune", "format_version": FORMAT_VERSION,
                            "library_version": __version__, "layout": "hf", "deltas": names,
                            "active": [n for n in dm.active if n in names],
                            "entries": {n: _entry(dm, n) for n in names}, "saved_at": time.time_ns()}
    if not dm.composition.is_plain_stack() and set(dm.composition.names()) <= set(names):
        data["composition"] = dm.composition.to_dict()
    return st_save(tensors, metadata={"format": "pt", META_KEY: json.dumps(data, sort_keys=True)})


def write_file(dm, names: list[str], root: Path) -> Path:
    """Write ``root/model.safetensors`` (refusing to replace one deltatune did not write)."""
    file = root / WEIGHTS
    if file.exists() and manifest(root) is None:
        raise ConfigError(f"{file} exists and was not written by deltatune (a full model?): save the "
                          f"deltas into another directory, or move that file away first.")
    atomic_write(file, blob(dm, names))
    return file


def load(dm, root: Path, name: str | None) -> tuple[dict[str, Any], list[str]]:
    """Add the deltas of the save in `root` to `dm` (only `name` if given); returns the manifest
    and the names added (core/loading.py activates them as saved)."""
    data = manifest(root)
    if data is None:
        raise CheckpointError(f"{root / WEIGHTS} is not a deltatune save.")
    if not isinstance(data.get("format_version"), int) or data["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{root / WEIGHTS} was saved by deltatune {data.get('library_version')}: "
                              f"upgrade deltatune to load it.")
    names = [n for n in data.get("deltas", []) if isinstance(n, str)]
    if name is not None:
        if name not in names:
            raise CheckpointError(f"{root} holds deltas {names}, not {name!r}.")
        names = [name]
    tensors = st_load((root / WEIGHTS).read_bytes())
    for n in names:
        _load_delta(dm, root, n, data["entries"].get(n), tensors)
    return data, names


def _load_delta(dm, root: Path, name: str, entry: Any, tensors: dict[str, torch.Tensor]) -> None:
    if not isinstance(entry, dict) or not {"config", "base"} <= set(entry):
        raise CheckpointError(f"{root / WEIGHTS}: the manifest lacks delta {name!r}'s entry; the file is corrupt.")
    start = f"{PREFIX}.{name}."
    own = {k[len(start):]: v for k, v in tensors.items() if k.startswith(start)}

    def load_tensors(delta) -> None:  # the training state as it was: the delta's own state_dict()
        want = delta.state_dict()
        missing, extra = sorted(set(want) - set(own)), sorted(set(own) - set(want))
        bad = [k for k in want if k in own and own[k].shape != want[k].shape]
        if missing or extra or bad:
            raise CheckpointError(f"{root / WEIGHTS}: delta {name!r} does not fit this model (missing "
                                  f"{missing[:3]}, unexpected {extra[:3]}, other shapes {bad[:3]}): load "
                                  f"it into the base model (and config) it was trained on.")
        delta.load_state_dict(own)

    add_saved(dm, root, root / WEIGHTS, name, entry, load_tensors)

