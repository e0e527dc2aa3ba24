"""Hugging Face `peft` checkpoints: load them as deltas and save deltas as them, without importing peft.

A peft checkpoint is a directory holding ``adapter_config.json`` (``peft_type`` plus that method's
fields) and its weights (peft_files.py). Tensor keys are ``base_model.model.<module path>.<peft
tensor>`` with the adapter name stripped; ``modules_to_save`` modules save their own parameters
under the same prefix. Each method both libraries share is one ``PeftMapping`` (peft_schema.py;
the mappings are in peft_methods.py, peft_adapters.py and peft_prompts.py): how its config fields
translate each way and how its tensor names map onto the deltatune layer's (peft_keys.py). This
file never branches on a method; importing it registers the format with ``core.state``, whose
``load`` / ``save`` dispatch to it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn

from ..core.delta import Delta, key_to_path
from ..core.layer import ParamCopy
from ..core.loading import as_delta_model
from ..core.registry import config_from_dict
from ..core.savedir import SAVERS, Saver
from ..core.state import LOADERS
from ..errors import CheckpointError
from .peft_files import CONFIG_FILE, detect, finish, read_config, read_weights, write_adapters
from .peft_keys import check_unmerged, our_item, peft_tensors
from .peft_registry import mapping_for_method, mapping_for_type
from .peft_schema import PeftFields, PeftMapping, task_type


def load_peft(model: nn.Module, root: Path, name: str | None = None):
    """Load the peft adapter in `root` as a delta named `name` ("default"), active."""
    for where in (root, root.parent):  # a save killed after its commit: finish it (root: one of several)
        try:
            finish(where)
        except OSError:
            pass  # a read-only directory: what its fixed names hold
    data = read_config(root)
    mapping = mapping_for_type(data["peft_type"], root)
    dm = as_delta_model(model)
    fields = PeftFields(data, mapping, root / CONFIG_FILE)
    config = config_from_dict(mapping.to_ours(fields, dm.model))
    fields.check_rest()
    check_unmerged(dm, mapping)
    tensors = dict(our_item(k, v, mapping, dm.model) for k, v in read_weights(root).items())
    name = name or "default"
    delta = dm.add(name, config)
    try:
        if mapping.prepare is not None:
            tensors = mapping.prepare(delta, tensors, dm.model, data)
        delta.load_delta_state_dict(tensors)
    except CheckpointError as e:
        dm.remove(name)
        raise CheckpointError(f"peft checkpoint {root}: {e}") from None
    except Exception:
        dm.remove(name)
        raise
    dm.activate(name)
    return dm


def adapter_files(dm, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Delta `name` as a peft adapter: its adapter_config.json entries and its tensors."""
    delta = dm.get_delta(name)
    mapping = mapping_for_method(delta.config.method)
    check_unmerged(dm, mapping)
    return adapter_config(delta, mapping, dm.model), peft_tensors(delta, mapping, dm.model)


def adapter_config(delta: Delta, mapping: PeftMapping, model: nn.Module) -> dict[str, Any]:
    """The adapter_config.json of a delta: peft's file metadata plus the mapping's fields."""
    return {
        "peft_type": mapping.peft_type, "task_type": saved_task_type(delta, model), "revision": None,
        "inference_mode": True,
        "base_model_name_or_path": loadable_name(model),
        "auto_mapping": {"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
        **mapping.to_peft(delta, model),
    }


# task types for which peft adds these heads to modules_to_save, and then expects their weights
_PEFT_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
               "QUESTION_ANS": ("qa_outputs",)}


def saved_task_type(delta: Delta, model: nn.Module) -> str | None:
    """peft's task_type for the model class, so that ``AutoPeftModelFor...`` gives the task class;
    None when peft would then expect a head the delta does not carry (a delta trained with the
    base's own head): peft's plain PeftModel loads that one."""
    task = task_type(model)
    heads = [key_to_path(k) for k, layer in delta.layers.items() if isinstance(layer, ParamCopy)]
    expected = [n for n, _ in model.named_children() if n in _PEFT_HEADS.get(task, ())]
    carried = all(any(h == n or h.startswith(n + ".") for h in heads) for n in expected)
    return task if carried else None


def loadable_name(model: nn.Module) -> str | None:
    """What the user loaded the base from, if ``from_pretrained`` can load it again: a hub id, or a
    directory with a config.json (not a GGUF-only one, not a path that is gone); else None."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    if name is None:
        return None
    path = Path(name)
    if path.is_dir():
        return name if (path / "config.json").is_file() else None
    looks_local = path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or path.suffix
    return None if looks_local else name


def place(root: Path, name: str) -> Path:
    """Where peft puts each of several adapters: "default" in `root`, any other in ``root/<name>``."""
    return root if name == "default" else root / name


LOADERS.append((detect, load_peft))
def write(dm, names: list[str], root: Path) -> None:
    """peft's layout: one adapter in `root`; several: "default" in `root`, the others in
    subdirectories; all of them in one all-or-nothing save (peft_files.write_adapters)."""
    adapters = {}
    for n in names:
        where = root if len(names) == 1 else place(root, n)
        adapters["" if where == root else where.name] = adapter_files(dm, n)
    write_adapters(root, adapters)


SAVERS["peft"] = Saver(write)
