"""The peft <-> deltatune mapping table: one ``register_peft(PeftMapping(...))`` per shared method.

Adding a method (its deltatune layer already names tensors like peft does): write ``to_ours``
(``fields.take`` every peft field it converts; ``targets_to_ours`` handles target_modules,
exclude_modules, layers_to_transform, layers_pattern and modules_to_save), ``to_peft`` (the reverse;
``targets_to_peft``), list the tensor spellings as ``KeyRule``s, and peft's non-empty defaults of the
fields left unread. Model-level tensors are ``KeyRule(whole peft key, delta key, full=True)``
(prompt methods: ``prompt_embeddings``; VeRA: ``base_model.vera_A``); ``load`` / ``save`` convert
values that differ (see LN tuning); prompt methods set ``head_prefix="base_model."``. A saved form
that needs setting up before loading (kept ranks, folding, shared buffers) is a ``prepare`` hook;
tensors a delta does not save itself are ``extra_tensors``; a delta whose own tensors are not peft's
(ones peft derives itself, a converted form) gives ``saved_tensors`` (LoRA with PiSSA / OLoRA).
More mappings: peft_adapters.py (IA3, LoHa, LoKr, VeRA, AdaLoRA), peft_prompts.py (prompt tuning,
P-tuning, prefix tuning).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..core.delta import Delta, key_to_path
from ..core.layer import ParamCopy, ParamDiff
from ..errors import CheckpointError, ConfigError
from .peft_registry import register_peft
from .peft_schema import KeyRule, PeftFields, PeftMapping
from .peft_targets import targets_to_ours, targets_to_peft


def _is_embedding(module: nn.Module | None) -> bool:
    return isinstance(module, nn.Embedding)


def _not_embedding(module: nn.Module | None) -> bool:
    return not isinstance(module, nn.Embedding)


# -- LoRA (with rsLoRA, DoRA, rank/alpha patterns, PiSSA / OLoRA) -----------------------------------
# peft's init_lora_weights -> ours. True / False / "gaussian" train an adapter for the unchanged base.
# "pissa" and "olora" rewrite peft's base into the residual W - s B0 A0 at load as at training time
# (PeftModel.from_pretrained runs the init again on the pretrained weights, then loads A, B): deltatune
# computes the same B0, A0 from the same pretrained weights (its layer subtracts them instead of
# rewriting the base: methods/lora.py), so such a checkpoint loads with peft's logits. Refused:
# "pissa_niter_<N>" (a randomized SVD drawn again at load: peft itself does not rebuild the trained
# model from the pretrained base), "loftq" (peft quantizes with bitsandbytes on CUDA, no double
# quantization: a different Q than deltatune's NF4), OLoRA on Conv1D (peft's olora_init factorizes
# the stored (in, out) matrix), and the inits deltatune does not have (corda, eva, orthogonal, ...).
_LORA_INIT = {True: "kaiming", False: "kaiming", "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}
_CONVERT = ("save_pretrained(..., path_initial_model_for_weight_conversion=...) in peft converts it to "
            "a plain LoRA of rank 2r that applies to the pretrained base")


def lora_to_ours(fields: PeftFields, model: nn.Module) -> dict[str, Any]:
    init = fields.take("init_lora_weights", True)
    known = init if isinstance(init, (bool, str)) else None
    if known not in _LORA_INIT:
        if isinstance(init, str) and init.startswith("pissa_niter_"):
            why = (f"peft draws the randomized SVD again when it loads the adapter, so neither peft nor "
                   f"deltatune can rebuild the trained model from the pretrained base; {_CONVERT}.")
        elif init == "loftq":
            why = ("peft's LoftQ base is a bitsandbytes NF4 quantization (no double quantization, made "
                   "on CUDA at load), which deltatune's NF4 does not reproduce, so the adapter would not "
                   "give peft's logits. Load peft's saved LoftQ base model and an adapter saved with "
                   "init_lora_weights=True (peft's LoftQ workflow) as a plain LoRA, or train with "
                   "deltatune's LoRAConfig(init='loftq').")
        else:
            why = ("deltatune converts True, False, 'gaussian' (adapters of the unchanged base), 'pissa' "
                   f"and 'olora' (recomputed from the pretrained base as peft does); {_CONVERT}.")
        raise fields.reject("init_lora_weights", init, why)
    fields.take("fan_in_fan_out")  # peft sets it from the module type (Conv1D: True), as deltatune does
    return {
        "method": "lora", "r": fields.take("r", 8), "alpha": fields.take("lora_alpha", 8),
        "dropout": fields.take("lora_dropout", 0.0), "rslora": fields.take("use_rslora", False),
        "dora": fields.take("use_dora", False), "init": _LORA_INIT[init],
        "rank_pattern": fields.take("rank_pattern") or None,
        "alpha_pattern": fields.take("alpha_pattern") or None,
        **targets_to_ours(fields, model),
    }


def _lora_layers(delta: Delta) -> list[tuple[str, nn.Module]]:
    return [(key_to_path(k), layer) for k, layer in delta.layers.items() if not isinstance(layer, ParamCopy)]


def _initial_factors(delta: Delta) -> bool:
    """Whether the delta's layers hold PiSSA / OLoRA's initial factors B0, A0."""
    return any(getattr(layer, "lora_A0", None) is not None for _, layer in _lora_layers(delta))


def _peft_form(delta: Delta, model: nn.Module) -> str:
    """How a LoRA delta is written for peft: "plain" (no initial factors), "native" (peft's
    init_lora_weights="pissa" / "olora": peft rebuilds B0, A0 from the pretrained base at load, the
    file holds A, B) or "converted" (a plain LoRA of rank 2r: A' = [A; A0], B' = [B, -B0], what peft's
    path_initial_model_for_weight_conversion writes; for inits peft does not rebuild: the randomized
    SVD, OLoRA on Conv1D)."""
    from transformers.pytorch_utils import Conv1D

    cfg = delta.config
    if getattr(cfg, "init", "kaiming") == "loftq":
        raise ConfigError("a LoRA delta with init='loftq' cannot be saved for peft: its base is deltatune's "
                          "NF4 quantization Q (saved in the delta), which peft's LoftQ (bitsandbytes NF4, "
                          "recomputed at load) does not rebuild. Save it in deltatune's format.")
    if not _initial_factors(delta):
        return "plain"
    conv = any(isinstance(model.get_submodule(p), Conv1D) for p, _ in _lora_layers(delta))
    if cfg.init == "pissa" or (cfg.init == "olora" and not conv):
        return "native"
    return "converted"


def lora_to_peft(delta: Delta, model: nn.Module) -> dict[str, Any]:
    from transformers.pytorch_utils import Conv1D

    cfg = delta.config
    form = _peft_form(delta, model)
    paths = [p for p, _ in _lora_layers(delta)]
    r, alpha = cfg.r, cfg.alpha
    ranks, alphas = dict(cfg.rank_pattern or {}), dict(cfg.alpha_pattern or {})
    if form == "converted":  # twice the rank at the same scaling: alpha / r, or alpha / sqrt(r)
        grow = 2 ** 0.5 if cfg.rslora else 2
        r, alpha = 2 * r, alpha * grow
        ranks = {k: 2 * v for k, v in ranks.items()}
        alphas = {k: v * grow for k, v in alphas.items()}
    init = {"plain": True if cfg.init == "kaiming" else cfg.init, "native": cfg.init, "converted": True}[form]
    return {
        "r": r, "lora_alpha": alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
        "use_dora": cfg.dora, "init_lora_weights": init, "rank_pattern": ranks, "alpha_pattern": alphas,
        "fan_in_fan_out": any(isinstance(model.get_submodule(p), Conv1D) for p in paths),
        "bias": "none", **targets_to_peft(delta, model),
    }


def lora_saved_tensors(delta: Delta, model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of the peft file: without B0, A0 (native: peft rebuilds them) or with them folded
    into a rank-2r A', B' (converted)."""
    state = delta.delta_state_dict()
    form = _peft_form(delta, model)
    if form == "plain":
        return state
    for path, layer in _lora_layers(delta):
        if getattr(layer, "lora_A0", None) is None:
            continue
        a0, b0 = state.pop(f"{path}.lora_A0"), state.pop(f"{path}.lora_B0")
        if form == "converted":
            state[f"{path}.lora_A"] = torch.cat([state[f"{path}.lora_A"], a0])
            state[f"{path}.lora_B"] = torch.cat([state[f"{path}.lora_B"], -b0], dim=1)
    return state


def lora_prepare(delta: Delta, tensors: dict[str, torch.Tensor], model: nn.Module,
                 data: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A peft PiSSA / OLoRA file holds A, B: B0, A0 are the ones the delta computed from the
    pretrained base when it was built (as peft's load computes them)."""
    from transformers.pytorch_utils import Conv1D

    if not _initial_factors(delta):
        return tensors
    conv = [p for p, _ in _lora_layers(delta) if isinstance(model.get_submodule(p), Conv1D)]
    if delta.config.init == "olora" and conv:
        raise CheckpointError(f"init_lora_weights='olora' on Conv1D module {conv[0]}: peft's olora_init "
                              f"factorizes the stored (in, out) matrix there, a split deltatune does not "
                              f"reproduce; {_CONVERT}.")
    out = dict(tensors)
    for path, layer in _lora_layers(delta):
        if getattr(layer, "lora_A0", None) is not None:
            out.setdefault(f"{path}.lora_A0", layer.lora_A0.detach().clone())
            out.setdefault(f"{path}.lora_B0", layer.lora_B0.detach().clone())
    return out


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
    prepare=lora_prepare, saved_tensors=lora_saved_tensors,
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
