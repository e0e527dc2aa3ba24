"""Shared helpers of the soft-prompt methods (prompt, ptuning, prefix): model-call plumbing,
where the inputs enter the model, cache lengths, prompt initialisation, and reparameterizations
that are cached for inference and folded into plain tensors for export.

Transformers versions differ in the name of the KV-cache argument (``cache`` in 5.x,
``past_key_values`` before); every helper here reads both and writes the one the model accepts.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
import torch.nn as nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.layer import DeltaLayer
from ..errors import ConfigError, TargetError

CACHE_KEYS = ("cache", "past_key_values")
# Encoder families whose first token is the [CLS] anchor the pooler / classifier reads.
CLS_FIRST = frozenset({
    "bert", "roberta", "xlm-roberta", "electra", "camembert", "distilbert", "albert", "deberta",
    "deberta-v2", "mpnet", "ernie", "megatron-bert", "xlm", "nystromformer", "mobilebert",
})


# -- configs -------------------------------------------------------------------------------------
def check_soft_config(cfg: DeltaConfig) -> None:
    """Soft prompts attach to the model's inputs (or every layer's attention): no module targets."""
    for name in ("targets", "layers", "exclude"):
        if getattr(cfg, name) is not None:
            cfg._fail(name, getattr(cfg, name),
                      f"None: {cfg.method!r} attaches to the model's inputs / attention cache, not to "
                      f"chosen modules (use num_virtual_tokens to size it)")
    cfg.check_range("num_virtual_tokens", 1, integer=True)
    if getattr(cfg, "insert_at", None) is not None:
        cfg.check_range("insert_at", 0, integer=True)


# -- call plumbing -------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def accepts(module: nn.Module, name: str) -> bool:
    params = signature(type(module)).parameters
    return name in params


def bind(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """All call arguments by name, so that hooks can read and replace them."""
    if not args:
        return dict(kwargs)
    params = [p for p in signature(type(module)).parameters.values() if p.name != "self"]
    named = dict(kwargs)
    for p, value in zip(params, args):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ConfigError(f"{type(module).__name__} was called with positional arguments that "
                              f"cannot be named: pass them as keywords (input_ids=..., ...).")
        named[p.name] = value
    return named


def cache_key(module: nn.Module) -> str:
    return next((k for k in CACHE_KEYS if accepts(module, k)), CACHE_KEYS[0])


def get_cache(kw: dict[str, Any]) -> Any:
    return next((kw[k] for k in CACHE_KEYS if kw.get(k) is not None), None)


def past_length(cache: Any) -> int:
    """Tokens already in a KV cache (any transformers version; 0 for None or empty)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])
    return 0


def without_outputs(out: Any, names: tuple[str, ...]) -> Any:
    """`out` without the items `names`, as if the model had never set them.

    A ``ModelOutput`` item set to None still counts as present (``"cache" in out``), and
    ``generate`` then hands that None back as the cache (beam search fails to reorder it), so the
    output is rebuilt without them.
    """
    if not isinstance(out, dict) or not any(k in out for k in names):
        return out
    kept = {k: v for k, v in out.items() if k not in names}
    return kept if type(out) is dict else type(out)(**kept)


def insert_cols(t: torch.Tensor, k: int, block: torch.Tensor) -> torch.Tensor:
    """`block` inserted before column `k` of `t` (dimension 1)."""
    return torch.cat([t[:, :k], block.to(t.dtype), t[:, k:]], dim=1)


def ones_mask(mask: torch.Tensor, k: int, n: int) -> torch.Tensor:
    if mask.dim() != 2:
        raise ConfigError(
            f"soft prompts need a 2-D attention mask (batch, length); got {mask.dim()}-D. Pass the "
            f"tokenizer's mask, or generate with the default DynamicCache (not a static cache)."
        )
    return insert_cols(mask, k, torch.ones(mask.shape[0], n, dtype=mask.dtype, device=mask.device))


def packed_starts(kw: dict[str, Any], what: str) -> list[int] | None:
    """Where each example of a packed row starts (no attention mask; 2-D position ids that do not
    go up by one there, as transformers finds packed sequences), or None for an ordinary batch."""
    pos = kw.get("position_ids")
    if kw.get("attention_mask") is not None or not isinstance(pos, torch.Tensor) or pos.dim() != 2:
        return None
    new = torch.diff(pos, dim=1) != 1
    if not bool(new.any()):
        return None
    if pos.shape[0] != 1:
        raise ConfigError(f"{what} in packed rows need one packed row per batch (padding-free "
                          f"packing), got {pos.shape[0]} rows with restarting position ids and no "
                          f"attention mask: pack into one row, or pass an attention mask.")
    return [0] + (new[0].nonzero().squeeze(1) + 1).tolist()


# -- where the model's inputs enter -----------------------------------------------------------------
def module_path(model: nn.Module, target: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is target:
            return name
    raise TargetError(f"module {type(target).__name__} is not part of {type(model).__name__}.")


def backbone(model: nn.Module) -> nn.Module:
    """Where a model-level soft layer runs: the base model inside a task model, which every caller
    passes through (the task model's own forward, and trainers that call the backbone directly:
    TRL's fused LM head runs ``model.base_model``), else the model itself."""
    inner = getattr(model, "base_model", None)
    if isinstance(inner, nn.Module) and inner is not model and any(m is inner for m in model.modules()):
        return inner
    return model


def input_embedding(model: nn.Module, host: nn.Module | None = None) -> tuple[str, nn.Embedding]:
    """Path and module of the embedding table that `host` (default: the model) reads ids with."""
    get = getattr(host if host is not None else model, "get_input_embeddings", None)
    emb = get() if get is not None else None
    if not isinstance(emb, nn.Embedding):
        raise TargetError(
            f"{type(model).__name__} has no input embedding table (get_input_embeddings() must "
            f"return an nn.Embedding): soft prompts need a Hugging Face-style transformer."
        )
    return module_path(model, emb), emb


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def default_insert_at(model: nn.Module) -> int:
    """1 (after [CLS]) on encoder families whose classifier reads the first token, else 0."""
    cfg = getattr(model, "config", None)
    if is_encoder_decoder(model):
        return 0
    return 1 if getattr(cfg, "model_type", None) in CLS_FIRST else 0


def position_limit(module: nn.Module) -> int | None:
    """How many positions a learned absolute position table under `module` holds (None: no table)."""
    limits = []
    for name, m in module.named_modules():
        if isinstance(m, nn.Embedding) and name.rsplit(".", 1)[-1] in (
                "position_embeddings", "wpe", "embed_positions"):
            pad = m.padding_idx + 1 if m.padding_idx is not None else 0
            limits.append(m.num_embeddings - pad - int(getattr(m, "offset", 0)))
    return min(limits) if limits else None


# -- initialisation ---------------------------------------------------------------------------------
def init_prompt(model: nn.Module, n: int, init: str, init_text: str | None = None,
                tokenizer: str | None = None) -> torch.Tensor:
    """(n, dim) starting embeddings: sampled vocabulary rows, a text's rows, or scale-matched noise."""
    table = input_embedding(model)[1].weight.detach()
    if init == "random":
        return torch.randn(n, table.shape[1], dtype=table.dtype, device=table.device) * table.float().std()
    if init == "text":
        ids = text_ids(model, init_text or "", tokenizer)
        ids = (ids * math.ceil(n / len(ids)))[:n]
    else:
        ids = torch.randint(0, table.shape[0], (n,)).tolist()
    return table[torch.tensor(ids, device=table.device)].clone()


def text_ids(model: nn.Module, text: str, tokenizer: str | None) -> list[int]:
    path = tokenizer or getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, ... for a missing tokenizer
        raise ConfigError(
            f"init='text' needs a local tokenizer: could not load one from {path!r} ({type(e).__name__}). "
            f"Pass tokenizer='path/to/model', or use init='vocab'."
        ) from None
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"init_text={text!r} gives no tokens: pass a non-empty text.")
    return list(ids)


# -- reparameterizations: cached for inference, folded for export -----------------------------------
class Foldable(DeltaLayer):
    """A layer whose trained tensors come out of a reparameterization (an MLP, an LSTM).

    ``compute()`` runs it; outside autograd the result is cached until a parameter changes.
    ``fold()`` replaces it by the plain tensor (what inference needs and what is saved by default).
    """

    folded_name: str = ""

    def compute(self) -> torch.Tensor:
        raise NotImplementedError

    def drop_reparam(self) -> None:
        raise NotImplementedError

    @property
    def folded(self) -> bool:
        return self.folded_name in self._parameters

    def value(self) -> torch.Tensor:
        if self.folded:
            return self._parameters[self.folded_name]
        if torch.is_grad_enabled():
            return self.compute()
        key = tuple((p.data_ptr(), p._version, p.device) for p in self.parameters())
        if getattr(self, "_cached_key", None) != key:
            self._cached_value, self._cached_key = self.compute(), key
        return self._cached_value

    @torch.no_grad()
    def folded_tensor(self) -> torch.Tensor:
        return self.value().detach().clone()

    def fold(self) -> None:
        if self.folded:
            return
        value = self.folded_tensor()
        self.drop_reparam()
        self._cached_key = self._cached_value = None
        self.register_parameter(self.folded_name, nn.Parameter(value))


class FoldableDelta(Delta):
    """A delta that saves its folded tensors unless ``config.save_reparam`` (to resume training)."""

    def foldables(self) -> dict[str, Foldable]:
        return {k: m for k, m in self.layers.items() if isinstance(m, Foldable)}

    @property
    def folded(self) -> bool:
        return all(m.folded for m in self.foldables().values())

    def fold(self) -> None:
        """Replace the reparameterization by its output, for inference (training continues on it)."""
        for layer in self.foldables().values():
            layer.fold()

    def delta_state_dict(self) -> dict[str, torch.Tensor]:
        state = super().delta_state_dict()
        if self.config.save_reparam:
            return state
        for key, layer in self.foldables().items():
            if layer.folded:
                continue
            own = {self._save_key(f"layers.{key}.{k}") for k in layer.state_dict()}
            state = {k: v for k, v in state.items() if k not in own}
            state[self._save_key(f"layers.{key}.{layer.folded_name}")] = layer.folded_tensor()
        return state

    def extra_state(self) -> dict[str, Any]:
        return {"folded": self.folded or not self.config.save_reparam}

    def state_extra(self) -> dict[str, Any]:
        return {"folded": self.folded}  # state_dict() keeps the reparameterization until fold()

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("folded"):
            self.fold()


def expand_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    return t.unsqueeze(0).expand(batch, *t.shape)


Maker = Callable[[nn.Module, str], DeltaLayer]  # (host module, call-context key) -> input layer
