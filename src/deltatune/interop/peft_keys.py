"""Tensor keys and values between a delta and a peft file: each mapping's ``KeyRule``s applied
both ways (``our_item`` on load, ``peft_item`` / ``peft_tensors`` on save)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..core.delta import Delta, key_to_path
from ..core.layer import ParamCopy
from ..errors import CheckpointError, ConfigError, MergeError
from .peft_schema import PeftMapping, Transform


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
    state = delta.delta_state_dict() if mapping.saved_tensors is None else mapping.saved_tensors(delta, model)
    for key, value in state.items():
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
