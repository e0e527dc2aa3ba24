"""Hugging Face `peft` checkpoints: load them as deltas and save deltas as them, without importing peft.

A peft checkpoint is a directory holding ``adapter_config.json`` (``peft_type`` plus that method's
fields) and ``adapter_model.safetensors`` (or the older ``adapter_model.bin``, read here only through
``torch.load(weights_only=True)``). Tensor keys are ``base_model.model.<module path>.<peft tensor>``
with the adapter name stripped; ``modules_to_save`` modules save their own parameters under the same
prefix. Each method both libraries share is one ``PeftMapping`` (peft_methods.py): how its config
fields translate each way and how its tensor names map onto the deltatune layer's. This file is
the generic machinery and never branches on a method. Config fields a mapping does not read must
hold peft's defaults; any other value is a ConfigError naming the field, never silently dropped.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..core.delta import Delta, key_to_path
from ..core.layer import ParamCopy
from ..core.registry import config_from_dict
from ..core.state import LOADERS, SAVERS, atomic_write
from ..core.targets import select
from ..errors import CheckpointError, ConfigError, MergeError, TargetError

# peft releases whose files these mappings were checked against (tests/interop round-trips).
PEFT_TESTED_VERSIONS = ("0.21.2",)
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"
# Fields of every peft config that describe the file, not the adapter's function.
METADATA = frozenset({"peft_type", "task_type", "base_model_name_or_path", "revision",
                      "inference_mode", "auto_mapping", "peft_version"})
_MISSING = object()


def _any_module(module: nn.Module | None) -> bool:
    return True


Transform = Callable[[torch.Tensor, nn.Module], torch.Tensor]


@dataclass(frozen=True)
class KeyRule:
    """One tensor spelling: ``<path>.<peft>`` in peft files is ``<path>.<ours>`` on the delta.
    ``full``: `peft` is a whole key of a model-level tensor (``prompt_embeddings``,
    ``base_model.vera_A``), `ours` its key on the delta. ``load`` / ``save`` convert values where
    the two differ (a full copy vs a difference to the base tensor): (tensor, base module) -> tensor."""

    peft: str                                              # e.g. "lora_A.weight"
    ours: str                                              # e.g. "lora_A"
    applies: Callable[[nn.Module | None], bool] = _any_module  # base-module types it is for
    load: Transform | None = None
    save: Transform | None = None
    full: bool = False


@dataclass(frozen=True)
class PeftMapping:
    """How one method converts. ``to_ours(fields, model)`` reads peft fields (``fields.take``) and
    returns a deltatune config dict; ``to_peft(delta, model)`` returns the peft fields of a delta."""

    peft_type: str
    method: str
    to_ours: Callable[[PeftFields, nn.Module], dict[str, Any]]
    to_peft: Callable[[Delta, nn.Module], dict[str, Any]]
    keys: tuple[KeyRule, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)  # defaults other than None/False/empty
    prefix: str = "base_model.model."       # before a module path in the method's tensor keys
    head_prefix: str = "base_model.model."  # before modules_to_save tensors
    # load: (delta, its tensors by our keys, model, peft config) -> the tensors to load, after
    # setting up what they need (kept ranks, folded form, shared buffers)
    prepare: Callable[[Delta, dict[str, torch.Tensor], nn.Module, dict[str, Any]],
                      dict[str, torch.Tensor]] | None = None
    # save: (delta, model) -> tensors by whole peft key that the delta does not save itself
    extra_tensors: Callable[[Delta, nn.Module], dict[str, torch.Tensor]] | None = None


MAPPINGS: dict[str, PeftMapping] = {}


def register_peft(mapping: PeftMapping) -> None:
    MAPPINGS[mapping.peft_type] = mapping


def tested() -> str:
    return ", ".join(PEFT_TESTED_VERSIONS)


class PeftFields:
    """The fields of one adapter_config.json. A mapping ``take``s what it converts; ``check_rest``
    then refuses every other field that does not hold its default."""

    def __init__(self, data: dict[str, Any], mapping: PeftMapping, source: Any):
        self.data = data
        self.mapping = mapping
        self.source = source
        self.used: set[str] = set(METADATA)

    def take(self, name: str, default: Any = None) -> Any:
        self.used.add(name)
        return self.data.get(name, default)

    def reject(self, name: str, value: Any, why: str) -> ConfigError:
        return ConfigError(
            f"{self.source}: peft field {name}={value!r} cannot be converted to deltatune "
            f"({self.mapping.peft_type}, checked against peft {tested()}): {why}"
        )

    def check_rest(self) -> None:
        for name, value in self.data.items():
            if name in self.used or _is_default(value, self.mapping.defaults.get(name, _MISSING)):
                continue
            default = self.mapping.defaults.get(name, None)
            raise self.reject(name, value, f"deltatune has no equivalent; only peft's default "
                                           f"({default!r}) converts.")


def _is_default(value: Any, default: Any) -> bool:
    if default is not _MISSING and value == default:
        return True
    return value is None or value is False or value in ("", [], {})


# -- targets, shared by the methods that have them -------------------------------------------------
def resolve_heads(model: nn.Module, names: list[str] | None) -> list[str]:
    """The modules peft wraps for ``modules_to_save``: names ending with an entry (outermost only)."""
    if not names:
        return []
    found = [n for n, _ in model.named_modules() if n and any(n.endswith(t) for t in names)]
    return [n for n in found if not any(n.startswith(o + ".") for o in found)]


def peft_layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """peft's layer index of a module: the first numbered component (after `layers_pattern`)."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    if not patterns:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        m = next((x for x in (re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name) for p in patterns)
                  if x), None)
    return int(m.group("idx")) if m else None


def _listed(name: str, names: list[str] | str) -> bool:
    if isinstance(names, str):
        return re.fullmatch(names, name) is not None
    return name in names or any(name.endswith("." + t) for t in names)


def peft_selects(name: str, f: dict[str, Any]) -> bool:
    """Whether peft's target matching picks module `name` (target/exclude/layers/modules_to_save)."""
    if f["exclude"] and _listed(name, f["exclude"]):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in f["heads"] or []):
        return False
    if not _listed(name, f["targets"]):
        return False
    layers = f["layers"]
    if layers is None or isinstance(f["targets"], str) or layers == []:
        return True
    idx = peft_layer_index(name, f["layers_pattern"])
    return idx is not None and (idx == layers if isinstance(layers, int) else idx in layers)


def targets_to_ours(fields: PeftFields, model: nn.Module, same_names: bool = True) -> dict[str, Any]:
    """peft's target_modules / exclude_modules / layers_to_transform / layers_pattern /
    modules_to_save as deltatune's targets / exclude / layers / modules_to_save: the same names
    where deltatune's module matching picks exactly the modules peft's does (and `same_names`: the
    method selects modules the core's way), else those modules' paths as one anchored regex."""
    f = {"targets": fields.take("target_modules"), "exclude": fields.take("exclude_modules"),
         "layers": fields.take("layers_to_transform"), "layers_pattern": fields.take("layers_pattern"),
         "heads": fields.take("modules_to_save")}
    if isinstance(f["heads"], str):
        f["heads"] = [f["heads"]]
    if f["targets"] is None:
        raise fields.reject("target_modules", None, "list the target modules explicitly.")
    if isinstance(f["targets"], str) and f["targets"].lower() == "all-linear":
        raise fields.reject("target_modules", f["targets"], "peft expands 'all-linear' when it saves; "
                            "list the modules (or a regex) instead.")
    heads = resolve_heads(model, f["heads"])
    paths = [n for n, _ in model.named_modules() if n and peft_selects(n, f)]
    if not paths:
        raise fields.reject("target_modules", f["targets"], "it selects no module of this model.")
    same = _same_names(f, heads) if same_names else None
    if same is not None and set(_selected(model, same, heads)) == set(paths):
        return {**same, "modules_to_save": heads}
    return {"targets": exact_regex(paths), "modules_to_save": heads}


def _same_names(f: dict[str, Any], heads: list[str]) -> dict[str, Any] | None:
    """deltatune's spelling of the same selection (checked against peft's before it is used)."""
    layers = [f["layers"]] if isinstance(f["layers"], int) else f["layers"] or None
    if f["layers_pattern"] or any("." in h for h in heads):
        return None
    return {"targets": _plain_names(f["targets"]), "exclude": _plain_names(f["exclude"]),
            "layers": layers}


def _selected(model: nn.Module, names: dict[str, Any], heads: list[str]) -> list[str]:
    """The modules deltatune's matching picks (before its type filter), heads left out as it does."""
    try:
        found = select(model, names["targets"], layers=names["layers"], exclude=names["exclude"])
    except TargetError:
        return []
    return [n for n, _ in found if n.split(".", 1)[0] not in heads]


def _plain_names(value: Any) -> Any:
    return sorted(value) if isinstance(value, (list, tuple, set)) else value


def exact_regex(paths: list[str]) -> str:
    return "|".join(re.escape(p) for p in paths)


def targets_to_peft(delta: Delta, model: nn.Module) -> dict[str, Any]:
    """The modules a delta touches as peft's target_modules (their exact paths) and modules_to_save."""
    heads, targets = [], []
    for key, layer in delta.layers.items():
        (heads if isinstance(layer, ParamCopy) else targets).append(key_to_path(key))
    names = [n for n, _ in model.named_modules() if n]
    for h in heads:  # peft wraps every module whose name ends with an entry
        clash = [n for n in names if n.endswith(h) and n != h and not n.startswith(h + ".")]
        if clash:
            raise ConfigError(f"cannot write modules_to_save entry {h!r} for peft: peft would also wrap "
                              f"{clash[:3]} (it matches name endings). Rename or drop that module.")
    ambiguous = any(n.endswith("." + t) for n in names for t in targets)
    return {"target_modules": exact_regex(targets) if ambiguous else targets,
            "modules_to_save": heads or None, "exclude_modules": None}


# -- tensors ----------------------------------------------------------------------------------------
def _module(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        return None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def our_item(key: str, value: torch.Tensor, mapping: PeftMapping,
             model: nn.Module) -> tuple[str, torch.Tensor]:
    """A peft tensor as the delta's ``<module path>.<tensor>`` key and value."""
    for rule in mapping.keys:
        if rule.full and key == rule.peft:
            return rule.ours, _convert(rule.load, value, model)
    rest = key[len(mapping.prefix):] if key.startswith(mapping.prefix) else None
    for rule in mapping.keys if rest is not None else ():
        if rule.full:
            continue
        if rest == rule.peft:
            path = ""
        elif rest.endswith("." + rule.peft):
            path = rest[: -len(rule.peft) - 1]
        else:
            continue
        module = _module(model, path)
        if rule.applies(module):
            return _join(path, rule.ours), _convert(rule.load, value, module)
    if not key.startswith(mapping.head_prefix):
        raise CheckpointError(f"peft tensor {key!r} has neither the {mapping.prefix!r} nor the "
                              f"{mapping.head_prefix!r} prefix: not a {mapping.peft_type} checkpoint.")
    path, _, pname = key[len(mapping.head_prefix):].rpartition(".")
    return f"{path}.values.{pname}", value  # a modules_to_save parameter (ParamCopy)


def _convert(transform: Transform | None, value: torch.Tensor, module: nn.Module | None) -> torch.Tensor:
    if transform is None or module is None:
        return value
    with torch.no_grad():
        return transform(value, module).detach()


def peft_item(path: str, name: str, value: torch.Tensor, layer: nn.Module, mapping: PeftMapping,
              model: nn.Module) -> tuple[str, torch.Tensor]:
    """A delta tensor (layer at `path`, tensor `name`) as its peft key and value."""
    if isinstance(layer, ParamCopy) and name.startswith("values."):
        return mapping.head_prefix + _join(path, name[len("values."):]), value
    module = _module(model, path)
    for rule in mapping.keys:
        if rule.full and _join(path, name) == rule.ours:
            return rule.peft, _convert(rule.save, value, model)
        if not rule.full and rule.ours == name and rule.applies(module):
            return mapping.prefix + _join(path, rule.peft), _convert(rule.save, value, module)
    raise ConfigError(f"tensor {_join(path, name)!r} of method {mapping.method!r} has no peft "
                      f"{mapping.peft_type} counterpart: this delta cannot be saved for peft.")


def peft_tensors(delta: Delta, mapping: PeftMapping, model: nn.Module) -> dict[str, torch.Tensor]:
    """The delta's saved tensors (its ``delta_state_dict``: compacted / folded forms) by peft key."""
    out: dict[str, torch.Tensor] = {}
    for key, value in delta.delta_state_dict().items():
        layer, path, name = _owner(delta, key)
        pkey, pvalue = peft_item(path, name, value, layer, mapping, model)
        out[pkey] = pvalue.detach().contiguous().cpu()
    if mapping.extra_tensors is not None:
        out.update({k: v.detach().contiguous().cpu() for k, v in mapping.extra_tensors(delta, model).items()})
    return out


def _owner(delta: Delta, key: str) -> tuple[nn.Module, str, str]:
    """(layer, module path, tensor name) of a ``delta_state_dict`` key: the longest layer path
    it starts with, else the root layer's (or the delta's own) tensor."""
    paths = sorted(((key_to_path(k), lay) for k, lay in delta.layers.items()), key=lambda x: -len(x[0]))
    for path, layer in paths:
        if path and key.startswith(path + "."):
            return layer, path, key[len(path) + 1:]
    root = dict(paths).get("")
    return (root if root is not None else delta), "", key


def check_unmerged(dm, mapping: PeftMapping) -> None:
    """Values computed from base tensors need the pristine base."""
    if dm.merged and any(r.load or r.save for r in mapping.keys):
        raise MergeError(f"deltas {list(dm.merged)} are merged into the base weights, which the "
                         f"{mapping.peft_type} conversion reads: call unmerge() first.")


# -- files ------------------------------------------------------------------------------------------
def read_config(root: Path) -> dict[str, Any]:
    try:
        data = json.loads((root / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{root / CONFIG_FILE} is not a readable JSON file ({e}).") from e
    if not isinstance(data, dict) or not isinstance(data.get("peft_type"), str):
        raise CheckpointError(f"{root / CONFIG_FILE} has no 'peft_type': not a peft adapter config.")
    return data


def mapping_for_type(peft_type: str, root: Path) -> PeftMapping:
    if peft_type not in MAPPINGS:
        raise CheckpointError(
            f"{root} is a peft {peft_type} adapter; deltatune converts peft types "
            f"{', '.join(sorted(MAPPINGS))} (checked against peft {tested()})."
        )
    return MAPPINGS[peft_type]


def mapping_for_method(method: str) -> PeftMapping:
    for m in MAPPINGS.values():
        if m.method == method:
            return m
    known = ", ".join(sorted(m.method for m in MAPPINGS.values()))
    raise ConfigError(f"method {method!r} has no peft equivalent that deltatune can write; "
                      f"peft format saves: {known}. Save it in deltatune's own format instead.")


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


def detect(root: Path) -> bool:
    return (root / CONFIG_FILE).is_file()


def load_peft(model: nn.Module, root: Path, name: str | None = None):
    """Load the peft adapter in `root` as a delta named `name` ("default"), active."""
    from ..core.model import DeltaModel

    data = read_config(root)
    mapping = mapping_for_type(data["peft_type"], root)
    dm = model if isinstance(model, DeltaModel) else DeltaModel(model)
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


def save_peft(dm, path: str | os.PathLike, name: str | None = None) -> None:
    """Write peft's layout: one delta in `path`; several as peft does ("default" in `path`, any
    other name in ``path/<name>``)."""
    root = Path(path)
    if name is not None or len(dm.deltas) == 1:
        save_one(dm, name or dm.deltas[0], root)
        return
    for n in dm.deltas:
        save_one(dm, n, root if n == "default" else root / n)


def save_one(dm, name: str, root: Path) -> None:
    delta = dm.get_delta(name)
    mapping = mapping_for_method(delta.config.method)
    check_unmerged(dm, mapping)
    model = dm.model
    config = {
        "peft_type": mapping.peft_type, "task_type": None, "revision": None, "inference_mode": True,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "auto_mapping": {"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
        **mapping.to_peft(delta, model),
    }
    blob = st_save(peft_tensors(delta, mapping, model), metadata={"format": "pt"})
    atomic_write(root / WEIGHTS_FILE, blob)
    atomic_write(root / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True).encode())


LOADERS.append((detect, load_peft))
SAVERS["peft"] = save_peft
