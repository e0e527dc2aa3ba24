"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): virtual tokens produced by a prompt encoder.

n trainable input embeddings go through an encoder, a bidirectional LSTM followed by a two-layer
ReLU MLP (``encoder="lstm"``, the paper's) or a three-layer ReLU MLP (``encoder="mlp"``), and its
output is the prompt, inserted like prompt tuning's (see ``_virtual.py``; P-tuning's templates
that interleave prompt and input are not modelled: the prompt is one block). The encoder only
helps optimisation: outside autograd its output is cached, ``delta.fold()`` replaces it by the
plain embeddings, and a save stores only those (``save_reparam=True`` keeps the encoder too, to
resume training).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from ..core.config import DeltaConfig
from ..core.registry import register
from . import _soft as soft
from ._virtual import VirtualTokens, attach


@dataclass
class PTuningConfig(DeltaConfig):
    """encoder: "lstm" | "mlp". encoder_hidden: its width (None: the embedding size).
    init: the encoder's input embeddings, "vocab" (sampled rows) or "random".
    save_reparam: also save the encoder (to resume training); by default only its output."""
    method: ClassVar[str] = "ptuning"

    num_virtual_tokens: int = 20
    encoder: str = "lstm"
    encoder_hidden: int | None = None
    init: str = "vocab"
    insert_at: int | None = None
    save_reparam: bool = False

    def validate(self) -> None:
        super().validate()
        soft.check_soft_config(self)
        self.check_choice("encoder", ("lstm", "mlp"))
        self.check_choice("init", ("vocab", "random"))
        self.check_choice("save_reparam", (True, False))
        if self.encoder_hidden is not None:
            self.check_range("encoder_hidden", 1, integer=True)


class PromptEncoder(nn.Module):
    def __init__(self, dim: int, hidden: int, kind: str):
        super().__init__()
        self.lstm = nn.LSTM(dim, hidden, num_layers=2, bidirectional=True, batch_first=True) \
            if kind == "lstm" else None
        width = 2 * hidden if self.lstm is not None else dim
        head = [nn.Linear(width, hidden), nn.ReLU()]
        if self.lstm is None:
            head += [nn.Linear(hidden, hidden), nn.ReLU()]
        self.mlp = nn.Sequential(*head, nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lstm is not None:
            x = self.lstm(x.unsqueeze(0))[0].squeeze(0)
        return self.mlp(x)


class PTuningLayer(VirtualTokens):
    folded_name = "prompt"

    def __init__(self, model: nn.Module, host: nn.Module, cfg: PTuningConfig, start: torch.Tensor, key: str):
        super().__init__(model, host, cfg.num_virtual_tokens, cfg.insert_at, strip_outputs=not soft.is_encoder_decoder(model),
                         key=key)
        dim = start.shape[1]
        self.prompt_input = nn.Parameter(start)
        self.prompt_encoder = PromptEncoder(dim, cfg.encoder_hidden or dim, cfg.encoder).to(
            device=start.device, dtype=start.dtype)

    def compute(self) -> torch.Tensor:
        return self.prompt_encoder(self.prompt_input)

    def drop_reparam(self) -> None:
        del self.prompt_encoder, self.prompt_input


class PTuningDelta(soft.FoldableDelta):
    config_cls = PTuningConfig

    def build(self, model: nn.Module) -> None:
        cfg = self.config
        start = soft.init_prompt(model, cfg.num_virtual_tokens, cfg.init)
        attach(self, model, lambda host, key: PTuningLayer(model, host, cfg, start, key))


register("ptuning", PTuningConfig, PTuningDelta, family="additive", lr=1e-2,
         paper="Liu et al. 2021 (P-tuning, GPT Understands, Too)")
