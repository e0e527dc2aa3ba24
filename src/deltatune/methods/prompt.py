"""Prompt tuning (Lester et al. 2021): n trainable virtual-token embeddings in the input.

The prompt starts from sampled vocabulary embeddings (``init="vocab"``, the paper's better
choice), from the embeddings of a text (``init="text"``, repeated to n tokens), or from noise
with the embedding table's scale (``init="random"``). How the tokens enter the model (masks,
positions, labels, generation with a KV cache) is in ``_virtual.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.registry import register
from . import _soft as soft
from ._virtual import VirtualTokens, attach


@dataclass
class PromptConfig(DeltaConfig):
    """num_virtual_tokens: prompt length. insert_at: None = after [CLS] on BERT-style encoders,
    else at the front. init: "vocab" | "text" | "random". init_text / tokenizer: for init="text"
    (tokenizer: a local path; None = the model's own ``name_or_path``)."""
    method: ClassVar[str] = "prompt"

    num_virtual_tokens: int = 20
    init: str = "vocab"
    init_text: str | None = None
    tokenizer: str | None = None
    insert_at: int | None = None

    def validate(self) -> None:
        super().validate()
        soft.check_soft_config(self)
        self.check_choice("init", ("vocab", "text", "random"))
        if self.init == "text" and not self.init_text:
            self._fail("init_text", self.init_text, "a non-empty text when init='text'")


class PromptLayer(VirtualTokens):
    folded_name = "prompt"

    def __init__(self, model: nn.Module, host: nn.Module, cfg: PromptConfig, start: torch.Tensor, key: str):
        super().__init__(model, host, cfg.num_virtual_tokens, cfg.insert_at, strip_outputs=not soft.is_encoder_decoder(model),
                         key=key)
        self.prompt = nn.Parameter(start)


class PromptDelta(Delta):
    config_cls = PromptConfig

    def build(self, model: nn.Module) -> None:
        cfg = self.config
        start = soft.init_prompt(model, cfg.num_virtual_tokens, cfg.init, cfg.init_text, cfg.tokenizer)
        attach(self, model, lambda host, key: PromptLayer(model, host, cfg, start, key))


register("prompt", PromptConfig, PromptDelta, family="additive", lr=3e-2, paper="Lester et al. 2021 (prompt tuning)")
