"""Ladder side tuning, LST (Sung et al. 2022): a small side network beside the frozen backbone.

The side network has one small transformer block per tapped backbone block, of width
``hidden / reduction_factor``. Ladders feed it the backbone's activations: side block i reads
``mu_i * down_i(h_i) + (1 - mu_i) * s_{i-1}``, where ``h_i`` is backbone block i's output,
``down_i`` a linear downsampling and ``mu_i = sigmoid(alpha_i / T)`` a learned gate (alpha_i = 0,
T = 0.1, as in the paper); ``s_0 = down_0(input of the first block)``. The side output, normalised
and up-projected (zero-initialised), is added to the backbone's last hidden states, which then go
through the model's own head: at init the model is exactly the base model, and its logits and
loss come out of the model's normal output.

The backbone's activations are detached where the ladders read them (and nothing else in the
frozen backbone requires grad), so no backward pass runs through the backbone: gradients reach only the side network and the head, and autograd keeps no
backbone activation for backward (LST's memory saving). Layers: a root layer that reads the
attention mask, a tap on every block (``targets`` / ``layers`` choose them, default every
encoder block), and the side network on the ``backbone_out`` module (its output is the last
hidden states). BERT-family encoders (role table rows with ``block`` and ``backbone_out``).

Decoders (GPT-2, Llama, ...) and encoder-decoders (T5) are refused when the delta is built: the
side attention is bidirectional and keeps no KV cache, so on a language model it would read the
tokens it must predict while training, and a cached generation step would run the side network
on the new token alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..core import arch
from ..core.outputs import main_tensor
from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.layer import DeltaLayer, first_input
from ..core.registry import register
from ..core.targets import select
from ..errors import TargetError


@dataclass
class LSTConfig(DeltaConfig):
    """reduction_factor: side width = hidden size / this. heads: side attention heads (None: the
    backbone's, when they divide the side width, else 1). gate_temperature: T in sigmoid(alpha/T)."""
    method: ClassVar[str] = "lst"

    reduction_factor: int = 8
    heads: int | None = None
    ffn_factor: int = 4
    gate_temperature: float = 0.1
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        self.check_range("reduction_factor", 1, integer=True)
        self.check_range("ffn_factor", 1, integer=True)
        if self.heads is not None:
            self.check_range("heads", 1, integer=True)
        self.check_range("gate_temperature", 0, low_open=True)
        self.check_range("dropout", 0.0, 1.0, high_open=True)


class Ladder:
    """What one forward pass hands from the backbone to the side network (not saved)."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.first: torch.Tensor | None = None
        self.taps: list[torch.Tensor] = []


class LadderInput(DeltaLayer):
    """Root layer: starts a pass, keeping the attention mask (the side attention needs it)."""

    def __init__(self, ladder: Ladder):
        super().__init__()
        self.ladder = ladder

    def forward_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self.ladder.mask = mask if isinstance(mask, torch.Tensor) else None
        self.ladder.first, self.ladder.taps = None, []
        return args, kwargs


class LadderTap(DeltaLayer):
    """On a backbone block: records its (detached) output, and the first block's input."""

    def __init__(self, ladder: Ladder):
        super().__init__()
        self.ladder = ladder

    def forward_post(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        if not self.ladder.taps and self.ladder.first is None:
            self.ladder.first = main_tensor(first_input(args, kwargs)).detach()
        self.ladder.taps.append(main_tensor(out).detach())
        return out


class SideBlock(nn.Module):
    """A pre-norm transformer block of the side width."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim), nn.Dropout(dropout))

    def forward(self, h: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        a = self.ln1(h)
        h = h + self.attn(a, a, a, key_padding_mask=pad, need_weights=False)[0]
        return h + self.ffn(self.ln2(h))


class SideNetwork(DeltaLayer):
    """On the backbone_out module: runs the side network and adds its up-projected output."""

    def __init__(self, ladder: Ladder, hidden: int, n_blocks: int, cfg: LSTConfig, backbone_heads: int | None):
        super().__init__()
        self.ladder = ladder
        dim = max(1, hidden // cfg.reduction_factor)
        heads = cfg.heads or (backbone_heads if backbone_heads and dim % backbone_heads == 0 else 1)
        if dim % heads:
            raise TargetError(f"LST side width {dim} (hidden {hidden} / reduction_factor "
                              f"{cfg.reduction_factor}) is not divisible by heads={heads}: change either.")
        self.temperature = cfg.gate_temperature
        self.down = nn.ModuleList(nn.Linear(hidden, dim) for _ in range(n_blocks + 1))
        self.gates = nn.Parameter(torch.zeros(n_blocks))
        self.blocks = nn.ModuleList(SideBlock(dim, heads, cfg.ffn_factor * dim, cfg.dropout)
                                    for _ in range(n_blocks))
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def side(self) -> torch.Tensor:
        lad = self.ladder
        if lad.first is None or len(lad.taps) != len(self.blocks):
            raise TargetError(f"LST saw {len(lad.taps)} tapped blocks in this pass, built for "
                              f"{len(self.blocks)}: the model must run its blocks once per call, "
                              f"through the model's own forward.")
        pad = None if lad.mask is None or lad.mask.dim() != 2 else lad.mask == 0
        s = self.down[0](lad.first)
        mu = torch.sigmoid(self.gates / self.temperature)
        for i, (h, block) in enumerate(zip(lad.taps, self.blocks)):
            s = block(mu[i] * self.down[i + 1](h) + (1 - mu[i]) * s, pad)
        return self.up(self.norm(s))

    def forward_post(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        # not detached: alone, nothing in the frozen backbone requires grad anyway; a delta stacked
        # inside the backbone (LoRA, ...) still trains through the backbone's own output
        last = out.last_hidden_state if hasattr(out, "last_hidden_state") else main_tensor(out)
        new = last + self.side().to(last.dtype)
        self.ladder.first, self.ladder.taps = None, []
        if hasattr(out, "last_hidden_state"):
            out.last_hidden_state = new  # ModelOutput: the attribute and its item
            return out
        return new if isinstance(out, torch.Tensor) else (new, *out[1:])


class LSTDelta(Delta):
    config_cls = LSTConfig

    default_roles = ("block",)

    def build(self, model: nn.Module) -> None:
        self._check_supported(model)
        blocks = self.targets(model)
        outs = select(model, arch.role_patterns(model, ("backbone_out",), "lst"), method="lst")
        if len(outs) != 1:
            raise TargetError(f"LST needs exactly one module giving the last hidden states "
                              f"(role backbone_out); found {[n for n, _ in outs]}.")
        ladder = Ladder()
        hidden = model.get_input_embeddings().embedding_dim
        heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
        self.add_layer("", LadderInput(ladder))
        for path, _ in blocks:
            self.add_layer(path, LadderTap(ladder))
        side = SideNetwork(ladder, hidden, len(blocks), self.config, heads)
        ref = next(model.parameters())
        self.add_layer(outs[0][0], side.to(device=ref.device, dtype=ref.dtype))

    def _check_supported(self, model: nn.Module) -> None:
        cfg = getattr(model, "config", None)
        name = type(model).__name__
        can_generate = getattr(model, "can_generate", None)
        encdec = bool(getattr(cfg, "is_encoder_decoder", False))
        if encdec or getattr(cfg, "is_decoder", False) or (callable(can_generate) and can_generate()):
            raise TargetError(
                f"lst supports BERT-family encoders only, not the {'encoder-decoder' if encdec else 'decoder'} "
                f"{name}: its side network attends in both directions and keeps no KV cache, so on a "
                f"decoder it would read the tokens it must predict while training and could not "
                f"generate step by step. Use 'lora' or 'adapter' on this model."
            )
        mtype = arch.model_type(model)
        roles = arch.ARCHITECTURES.get(mtype or "", {})
        missing = [r for r in ("block", "backbone_out") if r not in roles
                   and (r == "backbone_out" or self.config.targets is None)]
        if missing:
            known = sorted(a for a, t in arch.ARCHITECTURES.items() if "block" in t and "backbone_out" in t)
            raise TargetError(
                f"lst supports BERT-family encoders only ({', '.join(known)}): architecture "
                f"{mtype or name!r} has no role {' / '.join(map(repr, missing))} (the transformer "
                f"blocks the ladders tap, the module giving the last hidden states). Add them with "
                f"deltatune.core.arch.register_architecture({mtype!r}, {{'block': ..., "
                f"'backbone_out': ...}}), or use 'lora' or 'adapter' on this model."
            )

    def side_parameters(self) -> int:
        return sum(p.numel() for k, layer in self.layers.items() if isinstance(layer, SideNetwork)
                   for p in layer.parameters())


register("lst", LSTConfig, LSTDelta, family="additive", lr=5e-3, paper="Sung et al. 2022")
