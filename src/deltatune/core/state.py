"""Delta state I/O: safetensors tensors + a JSON config, never unpickled; reading and checking a
saved delta, and the primitives a save uses (core/savedir.py writes the directory).

Layout of one saved delta (a directory):
    delta_config.json              method config, versions, base fingerprint, the weights' name and sha256
    delta-<sha256[:16]>.safetensors the delta's tensors, keys ``<base module path>.<tensor>``

The JSON is written last with an atomic rename: it is the commit point, so a save killed at any
moment leaves the previous checkpoint loadable. Several deltas save into sub-directories named after
them, with ``deltas.json`` listing them and holding each one's config entry (core/savedir.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import CheckpointError, ConfigError
from ..version import FORMAT_VERSION, __version__
from .arch import model_type
from .registry import config_from_dict

CONFIG_FILE = "delta_config.json"
META_CHECKSUM = "meta_sha256"  # sha256 of the config's other entries: an edit or corruption shows
META_KEYS = {"format", "format_version", "library_version", "name", "config", "extra_state", "weights", "saved_at",
             "sha256", "base", META_CHECKSUM}
INDEX_FILE = "deltas.json"


LOADERS: list[Any] = []        # (detect(path) -> bool, load(model, path, name) -> DeltaModel)


def atomic_write(path: Path, data: bytes) -> None:
    """Write bytes to `path` through a temporary file in the same directory + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _quiet():
            os.unlink(tmp)
        raise


class _quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return True


def fingerprint(model: nn.Module, paths: list[str]) -> dict[str, Any]:
    """What a delta needs to fit: the architecture and the shapes of the modules it touches."""
    shapes: dict[str, dict[str, list[int]]] = {}
    for path in paths:
        module = model.get_submodule(path) if path else model
        shapes[path] = {n: list(p.shape) for n, p in module.named_parameters(recurse=False)}
    return {"class": type(model).__name__, "model_type": model_type(model), "modules": shapes}


def delta_meta(dm, name: str) -> tuple[dict[str, Any], bytes]:
    """A delta's config entry (checksummed) and its safetensors bytes, named by their sha256."""
    delta = dm.get_delta(name)
    tensors = {k: v.detach().contiguous().cpu() for k, v in delta.delta_state_dict().items()}
    blob = st_save(tensors, metadata={"format": "pt", "deltatune": __version__})
    digest = hashlib.sha256(blob).hexdigest()
    meta = {
        "format": "deltatune",
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "name": name,
        "config": delta.config.to_dict(),
        "extra_state": delta.extra_state(),
        "weights": f"delta-{digest[:16]}.safetensors",
        "sha256": digest,
        "base": fingerprint(dm.model, delta.paths()),
        "saved_at": time.time_ns(),
    }
    meta[META_CHECKSUM] = meta_digest(meta)
    return meta, blob


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable JSON file ({e}); the checkpoint is corrupt.") from e


def read_meta(root: Path, meta: Any = None) -> dict[str, Any]:
    """The checked config entry of the delta saved in `root` (or `meta`, one read already)."""
    meta = _read_json(root / CONFIG_FILE) if meta is None else meta
    if not isinstance(meta, dict) or meta.get("format") != "deltatune":
        raise CheckpointError(f"{root / CONFIG_FILE} is not a deltatune delta config.")
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{root / CONFIG_FILE} has no integer format_version; the file is corrupt.")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{root} was saved by deltatune {meta.get('library_version')} (format {version}); this is "
            f"deltatune {__version__} (format {FORMAT_VERSION}): upgrade deltatune to load it."
        )
    for key in ("config", "weights", "sha256", "name", "base"):
        if key not in meta:
            raise CheckpointError(f"{root / CONFIG_FILE} lacks the {key!r} entry; the file is corrupt.")
    unknown = sorted(set(meta) - META_KEYS)
    if unknown:
        raise CheckpointError(f"{root / CONFIG_FILE} has unknown entries {unknown}: the file is corrupt, or "
                              f"was written by a newer deltatune (upgrade deltatune to load it).")
    if META_CHECKSUM in meta and meta[META_CHECKSUM] != meta_digest(meta):
        raise CheckpointError(
            f"{root / CONFIG_FILE} does not match its checksum ({META_CHECKSUM}): the file is corrupt or "
            f"was edited. Restore it from a copy; to keep a deliberate edit, delete the {META_CHECKSUM!r} "
            f"entry.")
    return meta


def meta_digest(meta: dict[str, Any]) -> str:
    """sha256 of a delta config's entries (all but the checksum itself), in canonical JSON."""
    body = {k: v for k, v in meta.items() if k != META_CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_tensors(root: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    file = root / Path(str(meta["weights"])).name
    try:
        blob = file.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {file} ({e}); the checkpoint is incomplete.") from e
    if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise CheckpointError(f"{file} does not match the sha256 in {CONFIG_FILE}: it is truncated or corrupt.")
    try:
        return st_load(blob)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{file} is not a valid safetensors file ({e}).") from e


def _fingerprint_problem(base: Any) -> str | None:
    """What is wrong with the shape of a saved fingerprint ({"class", "model_type", "modules":
    {path: {tensor: [int, ...]}}}), or None; checked before any entry of it is read."""
    if not isinstance(base, dict):
        return f"it is a {type(base).__name__}, not an object"
    if not isinstance(base.get("model_type"), (str, type(None))):
        return f"'model_type' is {base.get('model_type')!r}, not a name"
    modules = base.get("modules", {})
    if not isinstance(modules, dict):
        return f"'modules' is a {type(modules).__name__}, not an object of module paths"
    for path, shapes in modules.items():
        if not isinstance(shapes, dict):
            return f"module {path!r} maps to {shapes!r}, not to its tensors' shapes"
        for n, shape in shapes.items():
            if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                      for d in shape):
                return f"{path}.{n} has shape {shape!r}, not a list of sizes"
    return None


def check_fingerprint(model: nn.Module, meta: dict[str, Any], root: Path, file: Path | None = None) -> None:
    """`file`: the file that holds `meta` (default: root/delta_config.json), for the messages."""
    base = meta["base"]
    problem = _fingerprint_problem(base)
    if problem is not None:
        raise CheckpointError(
            f"{file or root / CONFIG_FILE}: its 'base' entry (the fingerprint of the model it was trained on) is "
            f"malformed: {problem}. The file is corrupt or was edited: restore it from a copy, or save "
            f"the delta again from the model that holds it.")
    mtype = model_type(model)
    if base.get("model_type") != mtype:
        raise CheckpointError(
            f"{root} was trained on a {base.get('model_type')!r} model ({base.get('class')}), but this "
            f"model is {mtype!r} ({type(model).__name__}): load it into the base it was trained on."
        )
    for path, shapes in base.get("modules", {}).items():
        try:
            module = model.get_submodule(path) if path else model
        except AttributeError:
            raise CheckpointError(
                f"{root} touches module {path!r}, which this {type(model).__name__} lacks: "
                f"load it into the base it was trained on (same class and layout)."
            ) from None
        have = {n: list(p.shape) for n, p in module.named_parameters(recurse=False)}
        for n, shape in shapes.items():
            if have.get(n) != shape:
                raise CheckpointError(
                    f"{root}: {path}.{n} has shape {shape} in the base it was trained on but "
                    f"{have.get(n)} here: the base model differs (size or layout)."
                )


def load_one(dm, root: Path, name: str | None, activate: bool = True, meta: Any = None) -> None:
    """Add the delta saved in `root` (its config entry `meta` when the caller read it already)."""
    meta = read_meta(root, meta)
    delta = add_saved(dm, root, root / CONFIG_FILE, name or meta["name"], meta,
                      lambda delta: delta.load_delta_state_dict(read_tensors(root, meta)))
    if activate and not delta.combiner:  # a fusion runs only inside activate(..., fusion=name)
        dm.activate(name or meta["name"])


def add_saved(dm, root: Path, file: Path, name: str, entry: dict[str, Any], load_tensors: Any):
    """Add the delta a save's `entry` describes (in `file`) as `name`: the fingerprint checked, its
    config built, its extra state restored, then ``load_tensors(delta)``; removed again if any
    step fails, so a failed load leaves the model as it was."""
    check_fingerprint(dm.model, entry, root, file)
    try:
        config = config_from_dict(entry["config"])
    except ConfigError as e:
        raise CheckpointError(f"{file}: its method config is invalid: {e}") from e
    delta = dm.add(name, config)
    try:
        delta.load_extra_state(entry.get("extra_state") or {})
        load_tensors(delta)
    except Exception:
        dm.remove(name)
        raise
    return delta
