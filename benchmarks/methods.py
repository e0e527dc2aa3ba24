"""The benchmarked configurations: deltatune's and, where peft has the method, peft's twin."""
from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

QV = {"bert-base": ["query", "value"], "minilm": ["query", "value"], "llama-100m": ["q_proj", "v_proj"]}
ALL_LINEAR = {
    "bert-base": ["query", "key", "value", "dense"], "minilm": ["query", "key", "value", "dense"],
    "llama-100m": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
IA3 = {"bert-base": (["key", "value", "output.dense"], ["output.dense"]),
       "minilm": (["key", "value", "output.dense"], ["output.dense"]),
       "llama-100m": (["k_proj", "v_proj", "down_proj"], ["down_proj"])}


def _peft_lora(model_name: str, targets: list[str]):
    import peft

    return peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets)


def _peft_ia3(model_name: str):
    import peft

    t, ff = IA3[model_name]
    return peft.IA3Config(target_modules=t, feedforward_modules=ff)


def _peft_prompt(model_name: str):
    import peft

    task = peft.TaskType.CAUSAL_LM if model_name.startswith("llama") else peft.TaskType.SEQ_CLS
    return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=20)


# name -> (deltatune config builder, peft config builder or None, registry method needed)
CONFIGS: dict[str, tuple[Callable[[str], dict[str, Any]], Callable[[str], Any] | None, str]] = {
    "lora-qv": (lambda m: {"method": "lora", "r": 8, "alpha": 16, "targets": QV[m]},
                lambda m: _peft_lora(m, QV[m]), "lora"),
    "lora-all": (lambda m: {"method": "lora", "r": 8, "alpha": 16, "targets": ALL_LINEAR[m]},
                 lambda m: _peft_lora(m, ALL_LINEAR[m]), "lora"),
    "dora-qv": (lambda m: {"method": "lora", "r": 8, "alpha": 16, "dora": True, "targets": QV[m]},
                lambda m: _dora(m), "lora"),
    "ia3": (lambda m: {"method": "ia3"}, _peft_ia3, "ia3"),
    "prompt": (lambda m: {"method": "prompt", "num_virtual_tokens": 20}, _peft_prompt, "prompt"),
    "bitfit": (lambda m: {"method": "bitfit"}, None, "bitfit"),
    "layernorm": (lambda m: {"method": "layernorm"}, None, "layernorm"),
}

# deltatune-only rows (peft has no twin here, or none with the same defaults): each method's
# defaults, timed against the floor
for _name in ("adapter", "compacter", "prefix", "ptuning", "vera", "loha", "lokr", "diff_pruning",
              "lt_sft", "mask", "sparse_adapter", "mam", "unipelt", "adamix", "lst"):
    CONFIGS[_name] = (lambda m, n=_name: {"method": n}, None, _name)
CONFIGS["adalora"] = (lambda m: {"method": "adalora", "total_step": 1000}, None, "adalora")
# the LoRA derivatives (issue 20), at lora-qv's rank, alpha and targets so that each row reads against it
_SCHEDULED = {"increlora": {"total_step": 1000}, "loraprune": {"total_step": 1000},
              "delta_lora": {"start_step": 0}}
for _name in ("dylora", "lora_fa", "delta_lora", "increlora", "loraprune", "qalora"):
    _rank = {"init_r": 1, "target_r": 8} if _name == "increlora" else {"r": 8}
    CONFIGS[_name] = (lambda m, n=_name, k=_rank: {"method": n, **k, "alpha": 16, "targets": QV[m],
                                                   **_SCHEDULED.get(n, {})}, None, _name)
# LoRAPrune scores heads and FFN channels from the LoRA gradients of every projection they touch:
# all linear layers, so it reads against lora-all
CONFIGS["loraprune"] = (lambda m: {"method": "loraprune", "r": 8, "alpha": 16, "targets": ALL_LINEAR[m],
                                   "total_step": 1000}, None, "loraprune")


def _dora(model_name: str):
    cfg = _peft_lora(model_name, QV[model_name])
    cfg.use_dora = True
    return cfg


def peft_wrap(model: nn.Module, name: str, model_name: str) -> nn.Module:
    import peft

    cfg = CONFIGS[name][1](model_name)
    heads = [n for n, _ in model.named_children() if n in ("classifier", "score")]
    if heads and getattr(cfg, "modules_to_save", None) is None and not isinstance(cfg, peft.PromptTuningConfig):
        cfg.modules_to_save = heads
    return peft.get_peft_model(model, cfg)
