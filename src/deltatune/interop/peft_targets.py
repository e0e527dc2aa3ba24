"""peft's target matching (``target_modules`` / ``exclude_modules`` / ``layers_to_transform`` /
``layers_pattern`` / ``modules_to_save``) and its translation to and from deltatune's targets.

Names match as in the core (``core.targets.name_matches``: a list by dotted suffix, a string as a
full regex); what is peft's own is its layer index and its rule for heads, kept here exactly."""
from __future__ import annotations

import re
from typing import Any

import torch.nn as nn

from ..core.delta import Delta, key_to_path
from ..core.layer import ParamCopy
from ..core.targets import name_matches, select
from ..errors import ConfigError, TargetError
from .peft_schema import PeftFields


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


def peft_selects(name: str, f: dict[str, Any]) -> bool:
    """Whether peft's target matching picks module `name` (target/exclude/layers/modules_to_save)."""
    if f["exclude"] and name_matches(name, f["exclude"]):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in f["heads"] or []):
        return False
    if not name_matches(name, f["targets"]):
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
    """One regex that fully matches exactly these module paths."""
    return "|".join(re.escape(p) for p in paths)


def peft_target_list(targets: list[str], names: list[str]) -> list[str] | str:
    """target_modules as peft users write them: the modules' last names (``["query", "value"]``)
    when peft's suffix matching selects exactly these modules with them; else their full paths, or
    one exact regex when a full path is also another module's ending."""
    wanted = set(targets)
    short = sorted({t.rsplit(".", 1)[-1] for t in targets})
    if {n for n in names if name_matches(n, short)} == wanted:
        return short
    ambiguous = any(n.endswith("." + t) for n in names for t in targets)
    return exact_regex(targets) if ambiguous else targets


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
    return {"target_modules": peft_target_list(targets, names),
            "modules_to_save": heads or None, "exclude_modules": None}
