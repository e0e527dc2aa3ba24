"""Prefix tuning (Li & Liang 2021): trainable key/value prefixes at every attention layer.

Mechanism: the prefixes go in as an already-filled KV cache (a transformers ``DynamicCache``
holding n positions per layer, as peft does), so every layer attends to them with the model's own
attention code (BERT, RoBERTa, GPT-2, Llama/Mistral/Qwen with grouped KV heads, ...). The hook
on the model's backbone (where every caller passes, trainers calling it directly included)
extends the attention mask by n ones (making one when none is given) and passes the real tokens'
position ids (0.. unless given): the prefix occupies no positions. A call that finds a non-empty
cache continues a generation whose prefix is already in it (only the mask changes).

A call that keeps no cache (training, ``use_cache=False``) gets a *read-only* prefix cache: it
hands each layer its prefix in front of the call's keys without storing them, so a layer can be
run twice on the same states, which is what gradient checkpointing does in the backward pass;
for the call, the checkpointed layers are told they may keep such a cache
(``_can_checkpoint_with_cache``, transformers' own switch), instead of dropping it.
Encoder-decoders (T5) are refused: use ``prompt`` or ``ptuning`` there.

Training goes through the reparameterization P = MLP(P') (``projection=True``, the paper's:
Linear-tanh-Linear from n embeddings to every layer's keys and values); ``delta.fold()`` drops the
MLP for inference and a save stores only the prefixes (``save_reparam=True`` keeps the MLP, to
resume). ``projection=False`` trains the prefixes directly, initialised from the keys and values
the model computes for n sampled vocabulary tokens (the paper's "real words" initialisation).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..core.config import DeltaConfig
from ..core.registry import register
from ..errors import ConfigError, TargetError
from . import _soft as soft


@dataclass
class PrefixConfig(DeltaConfig):
    """projection: train through the MLP (hidden width ``projection_hidden``), else directly.
    save_reparam: also save the MLP (to resume training); by default only the prefixes.
    shift_positions: the real tokens take positions n.. after the prefix (peft's convention)
    instead of 0.. (the prefix takes none)."""
    method: ClassVar[str] = "prefix"

    num_virtual_tokens: int = 20
    projection: bool = True
    projection_hidden: int = 512
    save_reparam: bool = False
    shift_positions: bool = False

    def validate(self) -> None:
        super().validate()
        soft.check_soft_config(self)
        self.check_choice("projection", (True, False))
        self.check_choice("shift_positions", (True, False))
        self.check_choice("save_reparam", (True, False))
        self.check_range("projection_hidden", 1, integer=True)


def new_cache(model: nn.Module) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers < 4.56 builds it without a config
        return DynamicCache()


@functools.cache
def _read_only_class() -> type:
    from transformers import DynamicCache

    class ReadOnlyPrefix(DynamicCache):
        """The prefixes, handed to each layer in front of its keys; the call's own keys are not kept
        (``frozen`` after filling), so replaying a layer reads the same states. ``scale_prefix``
        (gates) scales a layer's prefix idempotently."""

        frozen = False

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
                   *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.frozen:
                return super().update(key_states, value_states, layer_idx, *args, **kwargs)
            self.reads = getattr(self, "reads", 0) + 1
            layer, g = self.layers[layer_idx], getattr(self, "scales", {}).get(layer_idx)
            keys, values = (layer.keys, layer.values) if g is None else (layer.keys * g, layer.values * g)
            return (torch.cat([keys.to(key_states.dtype), key_states], dim=-2),
                    torch.cat([values.to(value_states.dtype), value_states], dim=-2))

        def scale_prefix(self, layer_idx: int, g: torch.Tensor) -> None:
            self.scales = {**getattr(self, "scales", {}), layer_idx: g}

    return ReadOnlyPrefix


def read_only_cache(model: nn.Module) -> Any:
    cls = _read_only_class()
    try:
        return cls(config=model.config)
    except TypeError:  # transformers < 4.56 builds it without a config
        return cls()


def scale_prefix(cache: Any, layer_idx: int, g: torch.Tensor) -> None:
    """Scale layer `layer_idx`'s prefix by the gate `g` (UniPELT): in place in a generation cache,
    idempotently (a replayed layer scales once) in a read-only one."""
    if hasattr(cache, "scale_prefix"):
        cache.scale_prefix(layer_idx, g)
        return
    layer = cache.layers[layer_idx]
    layer.keys, layer.values = layer.keys * g, layer.values * g


@torch.no_grad()
def probe(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The keys and values the model computes for `ids`: (layers, 2, kv_heads, len(ids), head_dim)."""
    cache, was = new_cache(model), model.training
    model.eval()
    try:
        model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None],
              **{soft.cache_key(model): cache}, use_cache=True)
    finally:
        model.train(was)
    layers = [(layer.keys, layer.values) for layer in getattr(cache, "layers", [])
              if getattr(layer, "keys", None) is not None and layer.keys.numel()]
    if not layers:
        raise TargetError(f"{type(model).__name__} does not fill a KV cache in its forward pass: "
                          f"prefix tuning needs one (use 'prompt' for this model).")
    m = ids.shape[0]
    return torch.stack([torch.stack([k[0, :, -m:], v[0, :, -m:]]) for k, v in layers])


class PrefixLayer(soft.Foldable):
    folded_name = "prefix"

    def __init__(self, model: nn.Module, cfg: PrefixConfig, key: str):
        """`key`: the call-context name under which a call's filled cache is left (for gates)."""
        super().__init__()
        n = self.n = cfg.num_virtual_tokens
        table = soft.input_embedding(model)[1].weight
        self.key = key
        self.shift = n if getattr(cfg, "shift_positions", False) else 0  # composites (mam, unipelt) lack it
        if cfg.projection:  # one probe token tells the per-layer key/value shapes
            layers, _, heads, _, head_dim = probe(model, torch.zeros(1, dtype=torch.long, device=table.device)).shape
            self.shape = (layers, 2, heads, n, head_dim)
            self.prefix_input = nn.Parameter(torch.randn(n, table.shape[1], dtype=table.dtype, device=table.device))
            self.prefix_mlp = nn.Sequential(
                nn.Linear(table.shape[1], cfg.projection_hidden), nn.Tanh(),
                nn.Linear(cfg.projection_hidden, layers * 2 * heads * head_dim),
            ).to(table.device, table.dtype)
        else:
            ids = torch.randint(0, table.shape[0], (n,), device=table.device)
            self.prefix = nn.Parameter(probe(model, ids).clone())
            self.shape = tuple(self.prefix.shape)

    def compute(self) -> torch.Tensor:
        layers, _, heads, n, head_dim = self.shape
        out = self.prefix_mlp(self.prefix_input).view(n, layers, 2, heads, head_dim)
        return out.permute(1, 2, 3, 0, 4)

    def drop_reparam(self) -> None:
        del self.prefix_mlp, self.prefix_input

    # -- the call ---------------------------------------------------------------------------------
    def forward_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """On the model: a first call gets a cache filled with the prefixes (left in the call
        context as (cache, its length, whether it was created here)); later calls extend the mask."""
        ctx = self.call_context()
        ctx.pop(self.key)
        _restore_checkpointing(ctx.pop(f"{self.key}:checkpointed"))  # a failed call's, if any
        kw = soft.bind(module, args, kwargs)
        x = kw.get("input_ids")
        x = kw.get("inputs_embeds") if x is None else x
        if x is None:
            return args, kwargs
        if soft.packed_starts(kw, "prefixes") is not None:
            raise ConfigError("prefix tuning on packed rows (padding-free packing, e.g. TRL's packing=True) "
                              "would let the packed examples attend to each other (the prefix cache "
                              "hides the packing from transformers' mask): set packing=False, or use "
                              "'prompt' / 'ptuning', which handle packed rows.")
        batch, length = x.shape[:2]
        cache = soft.get_cache(kw)
        past = soft.past_length(cache)
        if past == 0:
            created = cache is None
            read_only = created and ((module.training and torch.is_grad_enabled()) or not _use_cache(module, kwargs))
            if not read_only and module.training and torch.is_grad_enabled() and _checkpointing(module):
                raise ConfigError(_CHECKPOINTING)
            cache = self._fill(module, (read_only_cache if read_only else new_cache)(module) if created
                               else cache, batch, x)
            cache.frozen = read_only
            for k in soft.CACHE_KEYS:
                kw.pop(k, None)
            kw[soft.cache_key(module)] = cache
            ctx.put(self.key, (cache, soft.past_length(cache), created))
            if read_only and _checkpointing(module):
                ctx.put(f"{self.key}:checkpointed", _keep_cache_when_checkpointing(module, cache))
            real_past = 0
        else:
            real_past = past - self.n
        kv = soft.past_length(cache) + length
        mask = kw.get("attention_mask")
        if mask is None:
            mask = torch.ones(batch, real_past + length, dtype=torch.long, device=x.device)
        if mask.dim() == 2 and mask.shape[1] < kv:
            mask = soft.ones_mask(mask, 0, kv - mask.shape[1])
        kw["attention_mask"] = mask
        if kw.get("position_ids") is not None and self.shift:
            kw["position_ids"] = kw["position_ids"] + self.shift
        elif kw.get("position_ids") is None and soft.accepts(module, "position_ids"):
            start = real_past + self.shift
            kw["position_ids"] = torch.arange(start, start + length, device=x.device).unsqueeze(0)
        return (), kw

    def _fill(self, model: nn.Module, cache: Any, batch: int, x: torch.Tensor) -> Any:
        dtype = x.dtype if x.is_floating_point() else soft.input_embedding(model)[1].weight.dtype
        prefix = self.value().to(dtype)
        for i in range(prefix.shape[0]):
            cache.update(soft.expand_batch(prefix[i, 0], batch), soft.expand_batch(prefix[i, 1], batch), i)
        return cache

    def forward_post(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        ctx = self.call_context()
        _restore_checkpointing(ctx.pop(f"{self.key}:checkpointed"))
        filled = ctx.pop(self.key)
        if filled is None:
            return out
        cache, length, created = filled
        read_only = getattr(cache, "frozen", False)
        if (getattr(cache, "reads", 0) if read_only else soft.past_length(cache) - length) == 0:
            raise ConfigError(f"{type(module).__name__} ran without reading the prefix from its KV cache. "
                              + _CHECKPOINTING)
        if created and (read_only or not _use_cache(module, kwargs)):
            out = soft.without_outputs(out, soft.CACHE_KEYS)  # the caller keeps no cache
        return out


_CHECKPOINTING = ("prefix tuning feeds its prefixes through the KV cache, which transformers drops under "
                  "gradient checkpointing when the call passes a cache of its own: train without one "
                  "(the default), call model.gradient_checkpointing_disable(), or use 'prompt' / 'ptuning'.")


def _keep_cache_when_checkpointing(module: nn.Module, cache: Any) -> list[tuple[nn.Module, Any]]:
    """For this call, the checkpointed layers under `module` keep the read-only `cache`: they are
    told they may (transformers' switch), and a hook hands it back to a layer that the model
    itself calls without its cache under checkpointing (GPT-2 does)."""
    layers = [m for m in module.modules() if getattr(m, "gradient_checkpointing", False)
              and hasattr(type(m), "_can_checkpoint_with_cache") and not m._can_checkpoint_with_cache]
    kept = []
    for m in layers:
        m._can_checkpoint_with_cache = True
        hook = m.register_forward_pre_hook(lambda mod, a, kw: _give_cache(mod, a, kw, cache), with_kwargs=True)
        kept.append((m, hook))
    return kept


def _give_cache(module: nn.Module, args: tuple, kwargs: dict, cache: Any) -> tuple[tuple, dict]:
    """`module`'s call with `cache` as its cache argument where the caller passed none (positional
    arguments stay positional: checkpointing reads gradients' inputs from them)."""
    key = soft.cache_key(module)
    params = [p.name for p in soft.signature(type(module)).parameters.values() if p.name != "self"]
    at = params.index(key) if key in params else len(args)
    if at < len(args):
        if args[at] is None:
            args = (*args[:at], cache, *args[at + 1:])
    elif kwargs.get(key) is None:
        kwargs = {**kwargs, key: cache}
    return args, kwargs


def _restore_checkpointing(kept: list[tuple[nn.Module, Any]] | None) -> None:
    for m, hook in kept or ():
        hook.remove()
        m.__dict__.pop("_can_checkpoint_with_cache", None)


def _checkpointing(module: nn.Module) -> bool:
    name = "is_activation_checkpointing"  # transformers >= 5.x; is_gradient_checkpointing before
    return bool(getattr(module, name if hasattr(type(module), name) else "is_gradient_checkpointing", False))


def _use_cache(module: nn.Module, kwargs: dict) -> bool:
    flag = kwargs.get("use_cache")
    return bool(getattr(getattr(module, "config", None), "use_cache", False) if flag is None else flag)


class PrefixDelta(soft.FoldableDelta):
    config_cls = PrefixConfig
    #: what to use instead on an encoder-decoder (composites that reuse this build say their own)
    encoder_decoder_hint: ClassVar[str] = "use 'prompt' or 'ptuning' (virtual tokens in the encoder input) for it"

    def build(self, model: nn.Module) -> None:
        if soft.is_encoder_decoder(model):
            raise TargetError(
                f"{self.config.method}: prefix tuning supports encoder-only and decoder-only models, not "
                f"the encoder-decoder {type(model).__name__} (the prefixes enter as a filled KV cache, "
                f"and its encoder reads none): {self.encoder_decoder_hint}."
            )
        self.add_layer("", PrefixLayer(model, self.config, f"{self.name}:prefix"),
                       site=soft.module_path(model, soft.backbone(model)))


register("prefix", PrefixConfig, PrefixDelta, family="additive", lr=1e-2, paper="Li & Liang 2021 (prefix tuning)")
