"""A deltatune save directory: which manifest is current, which files a save owns, and how a new
save replaces the old one all-or-nothing.

The commit point is one manifest file: ``delta_config.json`` (one delta) or ``deltas.json``
(several; each delta's config entry is embedded in it, its weights lie in ``<root>/<name>/``), or
for the Hugging Face layout (core/hfsave.py, what ``save_pretrained`` and Trainer write) the one
``model.safetensors`` that holds every delta with the manifest in its header.
Weights files are named by their sha256, so a save never overwrites a file that the previous
manifest names; the new manifest is renamed into place last, and only then are the previous
save's files removed: those its manifest names and that verify (our file name, the recorded
sha256), never another file. Killed at any moment, the directory loads as the previous save or
the new one; temporary files left by a kill are removed by the next save.
"""
from __future__ import annotations

import hashlib
import json
import re
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError
from . import hfsave
from .state import CONFIG_FILE, INDEX_FILE, _read_json, atomic_write, delta_meta

_NAME_RE = re.compile(r"[A-Za-z0-9_\-]+")  # delta names (DeltaModel refuses any other)
WEIGHTS_RE = re.compile(r"delta-[0-9a-f]{16}\.safetensors")
TEMP_RE = re.compile(r"\.(delta_config\.json|deltas\.json|model\.safetensors|delta-[0-9a-f]{16}\.safetensors)\..+")


def _json(path: Path) -> Any:
    """The file's JSON, or None when it is missing or unreadable (then no save owns it)."""
    try:
        return _read_json(path)
    except CheckpointError:
        return None


def _ours(data: Any) -> bool:
    return isinstance(data, dict) and data.get("format") == "deltatune"


def current(root: Path) -> str | None:
    """The manifest that holds the directory's last completed save: CONFIG_FILE, INDEX_FILE,
    hfsave.WEIGHTS or None. Several present (a save killed before it removed the others): the
    latest ``saved_at`` wins."""
    stamps: dict[str, int] = {}
    for f in (CONFIG_FILE, INDEX_FILE):
        if (root / f).is_file():
            data = _json(root / f)
            stamps[f] = data.get("saved_at", 0) if _ours(data) else -1
    hf = hfsave.manifest(root)
    if hf is not None:
        stamps[hfsave.WEIGHTS] = hf.get("saved_at", 0)
    return max(stamps, key=lambda f: stamps[f]) if stamps else None


def _verified(file: Path, sha256: Any) -> bool:
    if not WEIGHTS_RE.fullmatch(file.name) or not file.is_file():
        return False
    return hashlib.sha256(file.read_bytes()).hexdigest() == sha256


def owned(root: Path) -> set[Path]:
    """Files in `root` that a deltatune save wrote, as far as it can verify: the manifests that
    parse as ours, the weights they name that match their sha256, and the sub-directory configs."""
    files: set[Path] = {root / hfsave.WEIGHTS} if hfsave.manifest(root) is not None else set()
    single = _json(root / CONFIG_FILE)
    if _ours(single):
        files.add(root / CONFIG_FILE)
        if _verified(root / Path(str(single.get("weights"))).name, single.get("sha256")):
            files.add(root / Path(str(single["weights"])).name)
    index = _json(root / INDEX_FILE)
    if _ours(index):
        files.add(root / INDEX_FILE)
        entries = index.get("entries") if isinstance(index.get("entries"), dict) else {}
        for name in index.get("deltas", []) if isinstance(index.get("deltas"), list) else []:
            if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
                continue  # not a name a save writes: leave whatever it points at alone
            sub = root / name
            own = _json(sub / CONFIG_FILE)
            metas = [m for m in (entries.get(name), own) if _ours(m)]
            if _ours(own):
                files.add(sub / CONFIG_FILE)
            files |= {sub / Path(str(m.get("weights"))).name for m in metas
                      if _verified(sub / Path(str(m.get("weights"))).name, m.get("sha256"))}
    return files


def remove_temps(*dirs: Path) -> None:
    for d in dirs:
        if d.is_dir():
            for f in d.iterdir():
                if TEMP_RE.fullmatch(f.name) and f.is_file():
                    f.unlink(missing_ok=True)


def _dump(data: dict[str, Any]) -> bytes:
    return json.dumps(data, indent=2, sort_keys=True).encode()


def write(dm, names: list[str], root: Path) -> None:
    """Save `names` into `root` (one: root/delta_config.json; several: root/deltas.json and
    root/<name>/), leaving exactly this save's files of all deltatune wrote there."""
    def commit() -> set[Path]:
        if len(names) > 1:
            return _write_several(dm, names, root)
        meta, blob = delta_meta(dm, names[0])
        atomic_write(root / meta["weights"], blob)
        atomic_write(root / CONFIG_FILE, _dump(meta))  # the commit
        return {root / meta["weights"], root / CONFIG_FILE}
    _replace(root, commit)


def write_hf(dm, names: list[str], root: Path) -> None:
    """Save `names` in the Hugging Face layout: one root/model.safetensors (core/hfsave.py)."""
    _replace(root, lambda: {hfsave.write_file(dm, names, root)})


def _replace(root: Path, commit: Callable[[], set[Path]]) -> None:
    """Run `commit` (it writes the new save, returns its files), then remove the previous save's
    files that it no longer needs: only those a deltatune save wrote and that verify."""
    root.mkdir(parents=True, exist_ok=True)
    # temporary files a kill left: in root and in any delta sub-directory (an older save's too)
    remove_temps(root, *(d for d in root.iterdir() if d.is_dir() and _NAME_RE.fullmatch(d.name)))
    before = owned(root)
    keep = commit()
    for f in sorted(before - keep):
        f.unlink(missing_ok=True)
    for d in {f.parent for f in before - keep} - {root}:
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()


def _write_several(dm, names: list[str], root: Path) -> set[Path]:
    entries, keep = {}, {root / INDEX_FILE}
    for n in names:
        meta, blob = delta_meta(dm, n)
        atomic_write(root / n / meta["weights"], blob)
        atomic_write(root / n / CONFIG_FILE, _dump(meta))  # for dt.load(root / name) alone
        entries[n] = meta
        keep |= {root / n / meta["weights"], root / n / CONFIG_FILE}
    index: dict[str, Any] = {"format": "deltatune", "deltas": names, "active": list(dm.active),
                             "entries": entries, "saved_at": time.time_ns()}
    if not dm.composition.is_plain_stack():
        index["composition"] = dm.composition.to_dict()
    atomic_write(root / INDEX_FILE, _dump(index))  # the commit: these entries, not the sub-configs
    return keep



@dataclass(frozen=True)
class Saver:
    """How one format writes: ``write(dm, names, root)`` saves these deltas (one, or several each
    where the format places them) into the directory `root`. ``save`` is the one dispatch."""

    write: Callable[[Any, list[str], Path], None]


SAVERS: dict[str, Saver] = {"deltatune": Saver(write), "hf": Saver(write_hf)}  # other formats register theirs (interop/)


def save(dm, path: str | os.PathLike, name: str | None = None, format: str = "deltatune") -> None:
    """Save one delta (``name``), or every delta (each where the format places it) when the model
    holds several."""
    saver = SAVERS.get(format)
    if saver is None:
        raise ConfigError(f"unknown save format {format!r}: use one of {list(SAVERS)}.")
    if not dm.deltas:
        raise ConfigError("this model holds no delta, so there is nothing to save (it was removed or "
                          "unwrapped): add or load one first, or save the base model itself.")
    names = [dm.get_delta(name).name] if name is not None else list(dm.deltas)
    saver.write(dm, names, Path(path))
