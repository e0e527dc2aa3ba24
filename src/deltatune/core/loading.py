"""load(): a saved delta (deltatune's format, or one a registered loader detects) onto a model.

Above both the model wrapper and the state I/O (core/state.py), so neither imports the other's
caller: model.py saves through state.py; this module builds the DeltaModel that loads receive.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch.nn as nn

from ..errors import CheckpointError
from . import compose, hfsave
from .model import DeltaModel
from .savedir import current
from .state import CONFIG_FILE, INDEX_FILE, LOADERS, _read_json, load_one


def as_delta_model(model: nn.Module) -> DeltaModel:
    """`model` itself if it is a DeltaModel, else a new one around it (what every loader loads onto)."""
    return model if isinstance(model, DeltaModel) else DeltaModel(model)


def load(model: nn.Module, path: str | os.PathLike, name: str | None = None):
    """Load a saved delta (or a directory of them) onto `model` (a module or a DeltaModel)."""
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"{root} does not exist.")
    manifest = current(root) if root.is_dir() else None
    if manifest is None:
        for detect, loader in LOADERS:
            if detect(root):
                return loader(model, root, name)
        raise CheckpointError(f"{root} holds no {CONFIG_FILE} or {INDEX_FILE}: not a saved delta.")
    dm = as_delta_model(model)
    if manifest == hfsave.WEIGHTS:
        activate_saved(dm, *hfsave.load(dm, root, name))
        return dm
    if manifest == CONFIG_FILE:
        load_one(dm, root, name)
        return dm
    index = _read_json(root / INDEX_FILE)
    names = index.get("deltas", []) if isinstance(index, dict) else []
    if name is not None:
        if name not in names:
            raise CheckpointError(f"{root} holds deltas {names}, not {name!r}.")
        names = [name]
    entries = index.get("entries") if isinstance(index, dict) and isinstance(index.get("entries"), dict) else {}
    for n in names:  # each delta as the index committed it (an older index: its sub-directory's config)
        load_one(dm, root / n, n, activate=False, meta=entries.get(n))
    activate_saved(dm, index, names)
    return dm


def activate_saved(dm: DeltaModel, index: dict, names: list[str]) -> None:
    """Activate the loaded `names` as the save recorded (its composition, else its active list)."""
    comp = index.get("composition")
    if comp is not None and set(compose.from_dict(comp).names()) <= set(names):
        dm.activate(compose.from_dict(comp))
        return
    active = [n for n in index.get("active", []) if n in names and not dm.get_delta(n).combiner]
    dm.activate(*(active or [n for n in names if not dm.get_delta(n).combiner][:1]))
