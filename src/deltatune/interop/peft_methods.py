"""The peft <-> deltatune mapping table: one ``register_peft(PeftMapping(...))`` per shared method.

Adding a method (its deltatune layer already names tensors like peft does): write ``to_ours``
(``fields.take`` every peft field it converts; ``targets_to_ours`` handles target_modules,
exclude_modules, layers_to_transform, layers_pattern and modules_to_save), ``to_peft`` (the reverse;
``targets_to_peft``), list the tensor spellings as ``KeyRule``s, and peft's non-empty defaults of the
fields left unread. Model-level tensors are ``KeyRule(whole peft key, delta key, full=True)``
(prompt methods: ``prompt_embeddings``; VeRA: ``base_model.vera_A``); ``load`` / ``save`` convert
values that differ (see LN tuning); prompt methods set ``head_prefix="base_model."``. A saved form
that needs setting up before loading (kept ranks, folding, shared buffers) is a ``prepare`` hook;
tensors a delta does not save itself are ``extra_tensors``. More mappings: peft_adapters.py (IA3,
LoHa, LoKr, VeRA, AdaLoRA), peft_prompts.py (prompt tuning, P-tuning, prefix tuning).
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from ..core.delta import Delta, key_to_path
from ..core.layer import ParamCopy, ParamDiff
from ..errors import ConfigError
from .peft_registry import register_peft
from .peft_schema import KeyRule, PeftFields, PeftMapping
from .peft_targets import targets_to_ours, targets_to_peft


def _is_embedding(module: nn.Module | None) -> bool:
    return isinstance(module, nn.Embedding)


def _not_embedding(module: nn.Module | None) -> bool:
    return not isinstance(module, nn.Embedding)


# -- LoRA (with rsLoRA, DoRA, rank/alpha patterns) --------------------------------------------------
# init_lora_weights values whose trained adapters apply to the unchanged base weights. The rest
# (pissa, olora, corda, loftq, lora_ga, eva, orthogonal, mica, ...) rewrite the base model or
# change the layer, so their adapters do not fit the original base.
_LORA_INIT = {True: "kaiming", False: "kaiming", "gaussian": "gaussian"}


def lora_to_ours(fields: PeftFields, model: nn.Module) -> dict[str, Any]:
    init = fields.take("init_lora_weights", True)
    if (init if isinstance(init, (bool, str)) else None) not in _LORA_INIT:
        raise fields.reject("init_lora_weights", init, "only True, False and 'gaussian' train an "
                            "adapter for the unchanged base weights.")
    fields.take("fan_in_fan_out")  # peft sets it from the module type (Conv1D: True), as deltatune does
    return {
        "method": "lora", "r": fields.take("r", 8), "alpha": fields.take("lora_alpha", 8),
        "dropout": fields.take("lora_dropout", 0.0), "rslora": fields.take("use_rslora", False),
        "dora": fields.take("use_dora", False), "init": _LORA_INIT[init],
        "rank_pattern": fields.take("rank_pattern") or None,
        "alpha_pattern": fields.take("alpha_pattern") or None,
        **targets_to_ours(fields, model),
    }


def lora_to_peft(delta: Delta, model: nn.Module) -> dict[str, Any]:
    from transformers.pytorch_utils import Conv1D

    cfg = delta.config
    paths = [key_to_path(k) for k, layer in delta.layers.items() if not isinstance(layer, ParamCopy)]
    return {
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
        "use_dora": cfg.dora, "init_lora_weights": True if cfg.init == "kaiming" else "gaussian",
        "rank_pattern": dict(cfg.rank_pattern or {}), "alpha_pattern": dict(cfg.alpha_pattern or {}),
        "fan_in_fan_out": any(isinstance(model.get_submodule(p), Conv1D) for p in paths),
        "bias": "none", **targets_to_peft(delta, model),
    }


register_peft(PeftMapping(
    peft_type="LORA", method="lora", to_ours=lora_to_ours, to_peft=lora_to_peft,
    keys=(
        KeyRule("lora_A.weight", "lora_A", _not_embedding),
        KeyRule("lora_B.weight", "lora_B", _not_embedding),
        KeyRule("lora_embedding_A", "lora_A", _is_embedding),
        KeyRule("lora_embedding_B", "lora_B", _is_embedding),
        KeyRule("lora_magnitude_vector", "magnitude"),
    ),
    defaults={"bias": "none", "megatron_core": "megatron.core", "qalora_group_size": 16},
))


# -- LN tuning (peft LN_TUNING) <-> layernorm ---------------------------------------------------------
# peft trains a full copy of each target module; deltatune's layernorm trains the difference to
# the base tensors. Converting reads the (unmerged) base: copy = base + difference.
def ln_to_ours(fields: PeftFields, model: nn.Module) -> dict[str, Any]:
    # layernorm selects parameters, so its `exclude` would match parameter names: use exact paths
    return {"method": "layernorm", **targets_to_ours(fields, model, same_names=False)}


def ln_to_peft(delta: Delta, model: nn.Module) -> dict[str, Any]:
    for key, layer in delta.layers.items():
        if isinstance(layer, ParamDiff):
            module = model.get_submodule(key_to_path(key))
            have = {n for n, _ in module.named_parameters()}
            if set(layer.diffs) != have:
                raise ConfigError(
                    f"peft LN_TUNING trains every parameter of a module, but this layernorm delta "
                    f"tunes {sorted(layer.diffs)} of {key_to_path(key)} ({sorted(have)}): drop `params`.")
    return targets_to_peft(delta, model)


def _plus_base(name: str):
    return lambda diff, module: getattr(module, name) + diff


def _minus_base(name: str):
    return lambda full, module: full.to(getattr(module, name).dtype) - getattr(module, name)


register_peft(PeftMapping(
    peft_type="LN_TUNING", method="layernorm", to_ours=ln_to_ours, to_peft=ln_to_peft,
    keys=tuple(KeyRule(f"ln_tuning_layers.{n}", f"diffs.{n}", load=_minus_base(n), save=_plus_base(n))
               for n in ("weight", "bias")),
))
