"""peft <-> deltatune mappings of the prompt-learning methods: prompt tuning, P-tuning, prefix tuning.

peft saves one model-level tensor, ``prompt_embeddings``: the prompt (PROMPT_TUNING), the prompt
encoder's output (P_TUNING) or the flattened per-layer keys and values (PREFIX_TUNING, computed
through the projection MLP when there is one). So P-tuning and prefix checkpoints load as folded
deltas (``fold()``: the encoder / MLP dropped), and saving writes the folded form. peft puts virtual
tokens in front of the input (``insert_at=0``) and numbers the real tokens after a prefix
(``shift_positions=True``); deltas configured otherwise cannot be written for peft. Task heads are
saved under ``base_model.<module>``. Encoder-decoders (peft's ``num_transformer_submodules=2``) are
not converted.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..core.delta import ROOT_KEY, Delta
from ..errors import CheckpointError, ConfigError
from ..methods import _soft as soft
from .peft_registry import register_peft
from .peft_schema import KeyRule, PeftFields, PeftMapping, task_type, tested
from .peft_targets import resolve_heads, targets_to_peft

def _common_to_ours(method: str, fields: PeftFields, model: nn.Module) -> dict[str, Any]:
    dim = soft.input_embedding(model)[1].embedding_dim
    subs = fields.take("num_transformer_submodules", 1)
    if subs not in (None, 1) or soft.is_encoder_decoder(model):
        raise fields.reject("num_transformer_submodules", subs, "deltatune converts prompt learning for "
                            "encoder-only and decoder-only models (one transformer submodule).")
    if method != "prefix" and fields.take("token_dim", dim) not in (None, dim):
        raise fields.reject("token_dim", fields.data["token_dim"], f"the model's embeddings have {dim} dimensions.")
    fields.take("num_attention_heads")  # prefix: checked against the model's cache shape
    fields.take("num_layers")
    heads = fields.take("modules_to_save")
    return {"method": method, "num_virtual_tokens": fields.take("num_virtual_tokens"),
            "modules_to_save": resolve_heads(model, [heads] if isinstance(heads, str) else heads)}


def _common_to_peft(delta: Delta, model: nn.Module) -> dict[str, Any]:
    cfg = delta.config
    if getattr(cfg, "save_reparam", False):
        raise ConfigError(f"peft stores only the {cfg.method} output (a plain prompt), not the encoder: "
                          f"set save_reparam=False to save this delta for peft.")
    heads = targets_to_peft(delta, model)["modules_to_save"]
    return {"task_type": task_type(model), "num_virtual_tokens": cfg.num_virtual_tokens,
            "num_transformer_submodules": 1, "modules_to_save": heads, "inference_mode": True,
            "token_dim": soft.input_embedding(model)[1].embedding_dim,
            "num_layers": model.config.num_hidden_layers, "num_attention_heads": model.config.num_attention_heads}


def _front_only(delta: Delta, model: nn.Module) -> None:
    layer = delta.layers[ROOT_KEY] if ROOT_KEY in delta.layers else None
    if layer is None:
        raise ConfigError(f"this {delta.config.method} delta sits on an encoder-decoder's encoder; peft "
                          f"{tested()} conversion covers encoder-only and decoder-only models.")
    if layer.insert_at != 0:
        raise ConfigError(f"peft puts virtual tokens in front of the input, but this {delta.config.method} "
                          f"delta inserts them at position {layer.insert_at}: train with insert_at=0 to "
                          f"save it for peft.")


def _folded(delta: Delta, tensors: dict[str, torch.Tensor], model: nn.Module,
            data: dict[str, Any]) -> dict[str, torch.Tensor]:
    delta.fold()  # peft's file holds the encoder's output: load it as the plain tensor
    return tensors


# -- prompt tuning ----------------------------------------------------------------------------------
def prompt_to_ours(fields: PeftFields, model: nn.Module) -> dict[str, Any]:
    for name in ("prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"):
        fields.take(name)  # how the prompt started: the file holds the trained one
    return {**_common_to_ours("prompt", fields, model), "init": "random", "insert_at": 0}


def prompt_to_peft(delta: Delta, model: nn.Module) -> dict[str, Any]:
    _front_only(delta, model)
    return {**_common_to_peft(delta, model), "prompt_tuning_init": "RANDOM"}


register_peft(PeftMapping(
    peft_type="PROMPT_TUNING", method="prompt", to_ours=prompt_to_ours, to_peft=prompt_to_peft,
    keys=(KeyRule("prompt_embeddings", "prompt", full=True),), prefix="base_model.", head_prefix="base_model.",
    defaults={"prompt_tuning_init": "RANDOM"},
))


# -- P-tuning ---------------------------------------------------------------------------------------
def ptuning_to_ours(fields: PeftFields, model: nn.Module) -> dict[str, Any]:
    kind = fields.take("encoder_reparameterization_type", "MLP")
    if str(kind).upper() not in ("MLP", "LSTM"):
        raise fields.reject("encoder_reparameterization_type", kind, "deltatune's encoders are MLP and LSTM.")
    fields.take("encoder_num_layers")  # the encoder's shape: the file holds its (folded) output
    fields.take("encoder_dropout")
    return {**_common_to_ours("ptuning", fields, model), "encoder": str(kind).lower(), "init": "random",
            "encoder_hidden": fields.take("encoder_hidden_size"), "insert_at": 0}


def ptuning_to_peft(delta: Delta, model: nn.Module) -> dict[str, Any]:
    _front_only(delta, model)
    cfg = delta.config
    dim = soft.input_embedding(model)[1].embedding_dim
    return {**_common_to_peft(delta, model), "encoder_reparameterization_type": cfg.encoder.upper(),
            "encoder_hidden_size": cfg.encoder_hidden or dim, "encoder_num_layers": 2, "encoder_dropout": 0.0}


register_peft(PeftMapping(
    peft_type="P_TUNING", method="ptuning", to_ours=ptuning_to_ours, to_peft=ptuning_to_peft,
    keys=(KeyRule("prompt_embeddings", "prompt", full=True),), prefix="base_model.", head_prefix="base_model.",
    defaults={"encoder_reparameterization_type": "MLP", "encoder_num_layers": 2, "encoder_dropout": 0.0},
    prepare=_folded,
))


# -- prefix tuning ----------------------------------------------------------------------------------
# peft: (n, layers * 2 * heads * head_dim), viewed (n, layers, 2, heads, head_dim); deltatune's folded
# prefix: (layers, 2, heads, n, head_dim).
def prefix_to_ours(fields: PeftFields, model: nn.Module) -> dict[str, Any]:
    fields.take("token_dim")
    out = _common_to_ours("prefix", fields, model)
    hidden = fields.take("encoder_hidden_size")
    return {**out, "projection": bool(fields.take("prefix_projection", False)), "shift_positions": True,
            **({"projection_hidden": hidden} if hidden else {})}


def prefix_to_peft(delta: Delta, model: nn.Module) -> dict[str, Any]:
    cfg = delta.config
    if not cfg.shift_positions:
        raise ConfigError("peft numbers the real tokens after the prefix (positions n..), but this prefix "
                          "delta gives them positions 0..: train with shift_positions=True to save it for peft.")
    layers, _, heads, _, head_dim = delta.layers[ROOT_KEY].shape
    return {**_common_to_peft(delta, model), "prefix_projection": cfg.projection,
            "encoder_hidden_size": cfg.projection_hidden, "num_layers": layers, "num_attention_heads": heads,
            "token_dim": heads * head_dim}


def prefix_prepare(delta: Delta, tensors: dict[str, torch.Tensor], model: nn.Module,
                   data: dict[str, Any]) -> dict[str, torch.Tensor]:
    delta.fold()
    layers, two, heads, n, head_dim = shape = delta.layers[ROOT_KEY].shape
    flat = tensors.get("prefix")
    if flat is None or tuple(flat.shape) != (n, layers * two * heads * head_dim):
        raise CheckpointError(
            f"peft prefix prompt_embeddings has shape {None if flat is None else tuple(flat.shape)}, but this "
            f"model's {layers} layers x {heads} key/value heads x {head_dim} need ({n}, {layers * 2 * heads * head_dim}): "
            f"load it into the base model it was trained on.")
    return {**tensors, "prefix": flat.view(n, layers, two, heads, head_dim).permute(1, 2, 3, 0, 4).reshape(shape)}


def _flatten_prefix(prefix: torch.Tensor, model: nn.Module) -> torch.Tensor:
    return prefix.permute(3, 0, 1, 2, 4).reshape(prefix.shape[3], -1)


register_peft(PeftMapping(
    peft_type="PREFIX_TUNING", method="prefix", to_ours=prefix_to_ours, to_peft=prefix_to_peft,
    keys=(KeyRule("prompt_embeddings", "prefix", full=True, save=_flatten_prefix),),
    prefix="base_model.", head_prefix="base_model.", prepare=prefix_prepare,
))
