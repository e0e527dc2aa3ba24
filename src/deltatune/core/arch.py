"""Per-architecture roles: which module names play which part of a transformer block.

Methods ask for roles ("query", "value", "ffn_out", ...) instead of hard-coding module names, so
that one default works on BERT, GPT-2, Llama and T5. Each role is a regex that must match the end
of a module path. Users of other architectures pass ``targets=`` explicitly, or add a row with
``register_architecture``.
"""
from __future__ import annotations


import torch.nn as nn

from ..errors import TargetError

_BERT = {
    "query": r"attention\.self\.query", "key": r"attention\.self\.key",
    "value": r"attention\.self\.value", "attn_out": r"attention\.output\.dense",
    "ffn_in": r"intermediate\.dense", "ffn_out": r"layer\.\d+\.output\.dense",
    "layernorm": r"LayerNorm",
    # sublayer modules (their output is the sublayer's output before residual + LayerNorm)
    "attn_block": r"layer\.\d+\.attention\.output\.dense", "ffn_block": r"layer\.\d+\.output\.dense",
    # where a sublayer's input is seen, when not at the *_block module itself (parallel adapters)
    "attn_block_in": r"layer\.\d+\.attention\.self", "ffn_block_in": r"layer\.\d+\.intermediate",
    # whole transformer blocks, and the module whose output is the last hidden states (side networks)
    "block": r"encoder\.layer\.\d+", "backbone_out": r"encoder",
}
_GPT2 = {
    "query": r"attn\.c_attn", "key": r"attn\.c_attn", "value": r"attn\.c_attn",
    "attn_out": r"attn\.c_proj", "ffn_in": r"mlp\.c_fc", "ffn_out": r"mlp\.c_proj",
    "layernorm": r"ln_1|ln_2|ln_f",
    "attn_block": r"h\.\d+\.attn", "ffn_block": r"h\.\d+\.mlp",
}
_LLAMA = {
    "query": r"q_proj", "key": r"k_proj", "value": r"v_proj", "attn_out": r"o_proj",
    "ffn_in": r"up_proj|gate_proj", "ffn_out": r"down_proj",
    "layernorm": r"input_layernorm|post_attention_layernorm|model\.norm",
    "attn_block": r"layers\.\d+\.self_attn", "ffn_block": r"layers\.\d+\.mlp",
}
_T5 = {
    "query": r"(SelfAttention|EncDecAttention)\.q", "key": r"(SelfAttention|EncDecAttention)\.k",
    "value": r"(SelfAttention|EncDecAttention)\.v", "attn_out": r"(SelfAttention|EncDecAttention)\.o",
    "ffn_in": r"DenseReluDense\.wi(_0|_1)?", "ffn_out": r"DenseReluDense\.wo",
    "layernorm": r"layer_norm|final_layer_norm",
    "attn_block": r"block\.\d+\.layer\.\d+\.(SelfAttention|EncDecAttention)",
    "ffn_block": r"block\.\d+\.layer\.\d+\.DenseReluDense",
}

ARCHITECTURES: dict[str, dict[str, str]] = {
    "bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT, "electra": _BERT, "camembert": _BERT,
    "gpt2": _GPT2,
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA,
    "t5": _T5, "mt5": _T5,
}

# Top-level modules that a task model (…ForSequenceClassification, …) creates fresh.
HEAD_NAMES = ("classifier", "score", "classification_head", "qa_outputs")


def model_type(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None)


def register_architecture(name: str, roles: dict[str, str]) -> None:
    """Add (or extend) the role table of a ``config.model_type``."""
    ARCHITECTURES[name] = {**ARCHITECTURES.get(name, {}), **roles}


def role_patterns(model: nn.Module, roles: tuple[str, ...], method: str = "") -> str:
    """One regex matching every module that plays one of `roles` in this model."""
    mtype = model_type(model)
    table = ARCHITECTURES.get(mtype or "")
    if table is None:
        raise TargetError(
            f"no default targets for architecture {mtype or type(model).__name__!r}"
            f"{f' (method {method!r})' if method else ''}: pass targets=[...] (module-name suffixes) "
            f"or a regex, or call deltatune.core.arch.register_architecture({mtype!r}, {{...}}). "
            f"Known architectures: {', '.join(sorted(ARCHITECTURES))}."
        )
    found = [table[r] for r in roles if r in table]
    if not found:
        raise TargetError(
            f"architecture {mtype!r} has none of the roles {roles} that method {method!r} needs "
            f"by default; pass targets=[...] explicitly."
        )
    alternatives = "|".join(dict.fromkeys(found))
    return rf"(.*\.)?({alternatives})"


def head_modules(model: nn.Module) -> list[str]:
    """Names of fresh task heads at the top of a task model."""
    return [n for n, _ in model.named_children() if n in HEAD_NAMES]
