"""peft <-> deltatune mappings of the module-level adapters: IA3, LoHa, LoKr, VeRA, AdaLoRA.

Tensor names and layouts are the same in both libraries (deltatune's methods follow peft's), so
each mapping is config fields plus, where the saved form differs, a ``prepare`` / ``extra_tensors``
hook: AdaLoRA saves only the kept singular triplets (peft: ``rank_pattern`` masks; deltatune:
kept ranks), VeRA may carry its shared projections (``save_projection``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..core.delta import Delta, key_to_path
from ..core.layer import ParamCopy
from ..errors import CheckpointError, ConfigError
from .peft_registry import register_peft
from .peft_schema import KeyRule, PeftFields, PeftMapping, tested
from .peft_targets import exact_regex, peft_selects, targets_to_ours, targets_to_peft


def _paths(delta: Delta) -> list[str]:
    return [key_to_path(k) for k, layer in delta.layers.items() if not isinstance(layer, ParamCopy)]


def _fan_in_fan_out(model: nn.Module, paths: list[str]) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(model.get_submodule(p), Conv1D) for p in paths)


def _no_patterns(fields: PeftFields) -> None:
    for name in ("rank_pattern", "alpha_pattern"):
        value = fields.take(name)
        if value:
            raise fields.reject(name, value, "this deltatune method has one rank and alpha for every module.")


def _module_common(delta: Delta, model: nn.Module) -> dict[str, Any]:
    return {"fan_in_fan_out": _fan_in_fan_out(model, _paths(delta)), **targets_to_peft(delta, model)}


# -- IA3 --------------------------------------------------------------------------------------------
def ia3_to_ours(fields: PeftFields, model: nn.Module) -> dict[str, Any]:
    fields.take("fan_in_fan_out")
    fields.take("init_ia3_weights", True)  # the starting vectors only
    ff = fields.take("feedforward_modules")
    targets = targets_to_ours(fields, model)
    f = {"targets": ff, "exclude": None, "layers": None, "layers_pattern": None, "heads": None}
    chosen = [n for n, _ in model.named_modules() if n and ff and peft_selects(n, f)]
    if not chosen:
        raise fields.reject("feedforward_modules", ff, "deltatune's ia3 needs at least one feedforward "
                            "(input-scaling) module among the targets.")
    return {"method": "ia3", **targets, "feedforward": exact_regex(chosen)}


def ia3_to_peft(delta: Delta, model: nn.Module) -> dict[str, Any]:
    common = _module_common(delta, model)
    ff = [key_to_path(k) for k, lay in delta.layers.items() if getattr(lay, "feedforward", False)]
    as_regex = isinstance(common["target_modules"], str)
    return {**common, "feedforward_modules": exact_regex(ff) if as_regex else ff, "init_ia3_weights": True}


register_peft(PeftMapping(
    peft_type="IA3", method="ia3", to_ours=ia3_to_ours, to_peft=ia3_to_peft,
    keys=(KeyRule("ia3_l", "ia3_l"),),
))


# -- LoHa and LoKr (LyCORIS) --------------------------------------------------------------------------
_LYCORIS_DEFAULTS = {"rank_dropout": 0.0, "module_dropout": 0.0, "init_weights": True}


def _lycoris_to_ours(method: str, fields: PeftFields, model: nn.Module) -> dict[str, Any]:
    fields.take("init_weights", True)  # peft's init choice only (True / False / "lycoris")
    _no_patterns(fields)
    return {"method": method, "r": fields.take("r", 8), "alpha": fields.take("alpha", 8.0),
            **targets_to_ours(fields, model)}


def _lycoris_to_peft(delta: Delta, model: nn.Module) -> dict[str, Any]:
    if _fan_in_fan_out(model, _paths(delta)):
        raise ConfigError(f"peft's {delta.config.method} supports nn.Linear (and convolutions), not the GPT-2 "
                          f"Conv1D modules this delta adapts: it cannot be saved for peft {tested()}.")
    common = targets_to_peft(delta, model)
    return {"r": delta.config.r, "alpha": delta.config.alpha, "rank_pattern": {}, "alpha_pattern": {},
            "rank_dropout": 0.0, "module_dropout": 0.0, "init_weights": True, **common}


def loha_to_ours(fields: PeftFields, model: nn.Module) -> dict[str, Any]:
    return _lycoris_to_ours("loha", fields, model)


def lokr_to_ours(fields: PeftFields, model: nn.Module) -> dict[str, Any]:
    return {**_lycoris_to_ours("lokr", fields, model), "decompose_both": fields.take("decompose_both", False),
            "decompose_factor": fields.take("decompose_factor", -1)}


def lokr_to_peft(delta: Delta, model: nn.Module) -> dict[str, Any]:
    return {**_lycoris_to_peft(delta, model), "decompose_both": delta.config.decompose_both,
            "decompose_factor": delta.config.decompose_factor}


register_peft(PeftMapping(
    peft_type="LOHA", method="loha", to_ours=loha_to_ours, to_peft=_lycoris_to_peft,
    keys=tuple(KeyRule(n, n) for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")),
    defaults=_LYCORIS_DEFAULTS,
))
register_peft(PeftMapping(
    peft_type="LOKR", method="lokr", to_ours=lokr_to_ours, to_peft=lokr_to_peft,
    keys=tuple(KeyRule(n, n) for n in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")),
    defaults={**_LYCORIS_DEFAULTS, "decompose_factor": -1},
))


# -- VeRA -------------------------------------------------------------------------------------------
def vera_to_ours(fields: PeftFields, model: nn.Module) -> dict[str, Any]:
    fields.take("fan_in_fan_out")
    fields.take("init_weights", True)
    fields.take("save_projection", True)  # read by vera_prepare: the file has them or not
    return {"method": "vera", "r": fields.take("r", 256), "projection_prng_key": fields.take("projection_prng_key", 0),
            "d_initial": fields.take("d_initial", 0.1), "dropout": fields.take("vera_dropout", 0.0),
            **targets_to_ours(fields, model)}


def vera_to_peft(delta: Delta, model: nn.Module) -> dict[str, Any]:
    cfg = delta.config
    return {"r": cfg.r, "projection_prng_key": delta.projections.seed, "d_initial": cfg.d_initial,
            "vera_dropout": cfg.dropout, "save_projection": True, "init_weights": True, "bias": "none",
            **_module_common(delta, model)}


def vera_prepare(delta: Delta, tensors: dict[str, torch.Tensor], model: nn.Module,
                 data: dict[str, Any]) -> dict[str, torch.Tensor]:
    """peft's saved projections replace the regenerated ones (the same numbers when the PRNG agrees);
    without them (save_projection=False) the seed regenerates peft's A and B (tested bit for bit)."""
    tensors = dict(tensors)
    saved = {n: tensors.pop(n) for n in ("vera_A", "vera_B") if n in tensors}
    if not saved:
        return tensors
    p = delta.projections
    for n, t in saved.items():
        if t.shape != getattr(p, n).shape:
            raise CheckpointError(f"peft VeRA {n} has shape {tuple(t.shape)}, but this model and config give "
                                  f"{tuple(getattr(p, n).shape)}: load it into the base it was trained on.")
        setattr(p, n, t.to(dtype=getattr(p, n).dtype, device=getattr(p, n).device))
    return tensors


def vera_projections(delta: Delta, model: nn.Module) -> dict[str, torch.Tensor]:
    return {"base_model.vera_A": delta.projections.vera_A, "base_model.vera_B": delta.projections.vera_B}


register_peft(PeftMapping(
    peft_type="VERA", method="vera", to_ours=vera_to_ours, to_peft=vera_to_peft,
    keys=(KeyRule("vera_lambda_b", "vera_lambda_b"), KeyRule("vera_lambda_d", "vera_lambda_d"),
          KeyRule("base_model.vera_A", "vera_A", full=True), KeyRule("base_model.vera_B", "vera_B", full=True)),
    defaults={"bias": "none", "d_initial": 0.1, "init_weights": True, "save_projection": True},
    prepare=vera_prepare, extra_tensors=vera_projections,
))


# -- AdaLoRA ----------------------------------------------------------------------------------------
_ADALORA = ("init_r", "target_r", "total_step", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight")


def adalora_to_ours(fields: PeftFields, model: nn.Module) -> dict[str, Any]:
    fields.take("fan_in_fan_out")
    fields.take("r")                         # unused by peft's AdaLoRA (init_r sets the rank)
    fields.take("init_lora_weights", True)   # the starting values only
    fields.take("rank_pattern")              # kept-triplet masks: the saved tensor shapes carry them
    values = {n: fields.take(n) for n in _ADALORA}
    out = {"method": "adalora", **{n: v for n, v in values.items() if v is not None},
           "alpha": fields.take("lora_alpha", 8), "dropout": fields.take("lora_dropout", 0.0)}
    return {**out, **targets_to_ours(fields, model)}


def adalora_to_peft(delta: Delta, model: nn.Module) -> dict[str, Any]:
    cfg = delta.config
    masks = {f"{key_to_path(k)}.lora_E": lay.mask.tolist() for k, lay in delta.svd_layers().items()}
    return {**{n: getattr(cfg, n) for n in _ADALORA}, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
            "r": cfg.init_r, "rank_pattern": masks, "bias": "none", "init_lora_weights": True,
            **_module_common(delta, model)}


def adalora_prepare(delta: Delta, tensors: dict[str, torch.Tensor], model: nn.Module,
                    data: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Rebuild each module at its saved (kept) rank; peft's rank_pattern is set once the budget is final."""
    ranks = {path: int(tensors[f"{path}.lora_E"].shape[0]) for path in delta.ranks()
             if f"{path}.lora_E" in tensors}
    if len(ranks) != len(delta.ranks()):
        missing = sorted(set(delta.ranks()) - set(ranks))
        raise CheckpointError(f"peft AdaLoRA checkpoint has no lora_E for {missing[:3]}: not an adapter of "
                              f"these modules.")
    delta.load_extra_state({"ranks": ranks, "finalized": data.get("rank_pattern") is not None})
    return tensors


register_peft(PeftMapping(
    peft_type="ADALORA", method="adalora", to_ours=adalora_to_ours, to_peft=adalora_to_peft,
    keys=tuple(KeyRule(n, n) for n in ("lora_A", "lora_B", "lora_E")),
    defaults={"bias": "none", "megatron_core": "megatron.core", "qalora_group_size": 16, "loftq_config": {},
              "init_lora_weights": True, "lora_alpha": 8, "r": 8},
    prepare=adalora_prepare,
))
