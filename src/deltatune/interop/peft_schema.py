"""What a peft mapping declares: its tensor spellings (``KeyRule``), its config conversion
(``PeftMapping``), and the config fields it reads (``PeftFields``: every other field must hold
peft's default, else a ConfigError names it; nothing is silently dropped)."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..core.delta import Delta
from ..errors import ConfigError

# peft releases whose files these mappings were checked against (tests/interop round-trips).
PEFT_TESTED_VERSIONS = ("0.21.2",)
# Fields of every peft config that describe the file, not the adapter's function.
METADATA = frozenset({"peft_type", "task_type", "base_model_name_or_path", "revision",
                      "inference_mode", "auto_mapping", "peft_version"})
_MISSING = object()


# model class name endings -> peft task_type (which PeftModel subclass applies the prompt)
_TASKS = (("ForSequenceClassification", "SEQ_CLS"), ("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
          ("ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("ForTokenClassification", "TOKEN_CLS"),
          ("ForQuestionAnswering", "QUESTION_ANS"))


def task_type(model: nn.Module) -> str:
    """peft's task_type for the model's class (which PeftModel subclass and AutoPeftModel apply)."""
    name = type(model).__name__
    return next((t for end, t in _TASKS if name.endswith(end)), "FEATURE_EXTRACTION")


def tested() -> str:
    return ", ".join(PEFT_TESTED_VERSIONS)


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
    # save: (delta, model) -> the delta's tensors to write, by its own keys, when peft's file holds
    # another form of them than ``delta_state_dict()`` (tensors peft derives itself left out, a
    # converted form); None: ``delta_state_dict()``
    saved_tensors: Callable[[Delta, nn.Module], dict[str, torch.Tensor]] | None = None


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
