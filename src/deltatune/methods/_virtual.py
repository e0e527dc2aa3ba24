"""Virtual input tokens (prompt tuning, P-tuning): n trainable embeddings inserted into the input.

How they get in, so that every model-side use of ``input_ids`` keeps working (GPT-2/Llama
classifiers find the last real token by its id, RoBERTa numbers positions from ids):
- the *input layer* (on the model's backbone, e.g. ``bert`` / ``model`` inside a task model, which
  every caller passes through, trainers calling the backbone directly included; or on the
  encoder stack of an encoder-decoder) inserts n
  virtual ids ``vocab_size + i`` into ``input_ids`` at ``insert_at`` (after [CLS] on BERT-style
  encoders, else at the front), and extends ``attention_mask`` (ones), ``token_type_ids``,
  ``position_ids`` (given ones: the inserted tokens take the next positions), ``labels`` (-100)
  and QA start/end positions; given ``inputs_embeds`` it inserts the embeddings directly;
- the *embedding layer* on the input embedding table looks the virtual ids up in the prompt
  (the base table is never read out of range);
- on an encoder-decoder, a *cross-mask layer* on the decoder extends the encoder attention mask
  that the model hands to cross-attention (generate() runs the encoder on its own).
Outputs of the backbone (last_hidden_state, hidden_states) are cut back to the caller's length,
so the task head sees, and its logits and loss line up with, the caller's tokens and labels
(a causal LM's loss is the base's: the first real token is not scored from the prompt).

Generation with a KV cache: a call that finds a non-empty cache continues a sequence whose prompt
is already in the cache, so only the attention mask (n more ones) and given position ids (+n)
change. Virtual tokens count towards the model's position limit; too long inputs get a clear error.

Packed rows (padding-free packing, e.g. TRL's ``packing=True``: one row of several examples, no
attention mask, position ids restarting at 0 for each): every example gets its own n virtual
tokens, as if it ran alone; the flash-attention lengths (``cu_seq_lens_*``, ``max_length_*``) and
``seq_idx`` follow, and the outputs are cut back to the examples' own tokens.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..core.delta import Delta
from ..core.layer import DeltaLayer
from ..errors import ConfigError
from . import _soft as soft

SEQ_OUTPUTS = ("logits", "last_hidden_state")
SPAN_OUTPUTS = ("start_logits", "end_logits")
SPAN_INPUTS = ("start_positions", "end_positions")


class VirtualTokens(soft.Foldable):
    """The input layer; subclasses say where the (n, dim) virtual embeddings come from."""

    def __init__(self, model: nn.Module, host: nn.Module, n: int, insert_at: int | None,
                 strip_outputs: bool, key: str):
        """`key`: the call-context name prefix: ``<key>:table`` holds the virtual embeddings for the
        embedding layer, ``<key>:slot`` where this call's tokens went (for cutting the outputs)."""
        super().__init__()
        self.n = n
        self.key = key
        self.vocab_size = soft.input_embedding(model, host)[1].num_embeddings
        self.insert_at = soft.default_insert_at(model) if insert_at is None else insert_at
        self.limit = soft.position_limit(host)
        self.strip_outputs = strip_outputs

    def virtual_embeddings(self) -> torch.Tensor:
        return self.value()

    # -- the call ---------------------------------------------------------------------------------
    def forward_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.call_context().pop(f"{self.key}:slot")
        kw = soft.bind(module, args, kwargs)
        x = kw.get("input_ids")
        x = kw.get("inputs_embeds") if x is None else x
        if x is None:
            return args, kwargs
        past = soft.past_length(soft.get_cache(kw))
        starts = soft.packed_starts(kw, "virtual tokens") if past == 0 else None
        if past > 0:
            self._continue(kw, past, x.shape[1])
        elif starts is not None:
            self._insert_packed(kw, starts, x.shape[1])
        else:
            self._insert(kw, x.shape[0], x.shape[1])
        return (), kw

    def _continue(self, kw: dict[str, Any], past: int, length: int) -> None:
        """A generation step after the first: the prompt is in the cache already."""
        mask = kw.get("attention_mask")
        if mask is not None and mask.dim() == 2 and mask.shape[1] < past + length:
            kw["attention_mask"] = soft.ones_mask(mask, min(self.insert_at, mask.shape[1]), self.n)
        if kw.get("position_ids") is not None:
            kw["position_ids"] = kw["position_ids"] + self.n

    def _insert(self, kw: dict[str, Any], batch: int, length: int) -> None:
        n, k = self.n, min(self.insert_at, length)
        if self.limit is not None and length + n > self.limit:
            raise ConfigError(
                f"{length} input tokens + {n} virtual tokens exceed the model's {self.limit} positions: "
                f"truncate inputs to {self.limit - n} tokens (tokenizer max_length), or use fewer virtual tokens."
            )
        ids = kw.get("input_ids")
        if ids is not None:
            if bool((ids >= self.vocab_size).any()):
                raise ConfigError("two virtual-token deltas (prompt / ptuning) are active at once: "
                                  "activate only one of them.")
            virtual = torch.arange(n, device=ids.device) + self.vocab_size
            kw["input_ids"] = soft.insert_cols(ids, k, virtual.expand(batch, n))
            self.call_context().put(f"{self.key}:table", self.virtual_embeddings())
        else:
            emb = kw["inputs_embeds"]
            kw["inputs_embeds"] = soft.insert_cols(emb, k, soft.expand_batch(self.virtual_embeddings(), batch))
        self._extend_per_token(kw, batch, length, k)
        self.call_context().put(f"{self.key}:slot", (k, length + n, None))

    def _insert_packed(self, kw: dict[str, Any], starts: list[int], length: int) -> None:
        """n virtual tokens into each example of a packed row (at ``insert_at`` within it)."""
        n, bounds = self.n, list(zip(starts, starts[1:] + [length]))
        if self.limit is not None and max(e - s for s, e in bounds) + n > self.limit:
            raise ConfigError(f"a packed example + {n} virtual tokens exceeds the model's {self.limit} "
                              f"positions: pack shorter examples (max_length) or use fewer virtual tokens.")
        cuts = [s + min(self.insert_at, e - s) for s, e in bounds]  # where each example's tokens go

        def spread(t: torch.Tensor, block: Any) -> torch.Tensor:  # block(j, t) -> (1, n, ...) for example j
            pieces, at = [], 0
            for j, c in enumerate(cuts):
                pieces += [t[:, at:c], block(j, t)]
                at = c
            return torch.cat(pieces + [t[:, at:]], dim=1)

        ids = kw.get("input_ids")
        if ids is not None:
            virtual = (torch.arange(n, device=ids.device) + self.vocab_size)[None]
            kw["input_ids"] = spread(ids, lambda j, t: virtual)
            self.call_context().put(f"{self.key}:table", self.virtual_embeddings())
        else:
            emb = self.virtual_embeddings()[None]
            kw["inputs_embeds"] = spread(kw["inputs_embeds"], lambda j, t: emb.to(t.dtype))
        pos = kw["position_ids"]
        first = [pos[:, c - 1:c] + 1 if c > s else pos[:, s:s + 1] for (s, _), c in zip(bounds, cuts)]
        shifted = torch.cat([pos[:, s:e] + n * (torch.arange(s, e, device=pos.device) >= c)
                             for (s, e), c in zip(bounds, cuts)], dim=1)
        kw["position_ids"] = spread(shifted, lambda j, t: first[j] + torch.arange(n, device=pos.device))
        for name in ("token_type_ids", "seq_idx"):
            if isinstance(kw.get(name), torch.Tensor):
                kw[name] = spread(kw[name], lambda j, t: t[:, max(cuts[j] - 1, bounds[j][0])][:, None].expand(-1, n))
        for name in ("cu_seq_lens_q", "cu_seq_lens_k"):
            if isinstance(kw.get(name), torch.Tensor):
                kw[name] = kw[name] + n * torch.arange(kw[name].shape[-1], device=kw[name].device)
        for name in ("max_length_q", "max_length_k"):
            if kw.get(name) is not None:
                kw[name] = kw[name] + n
        keep = torch.ones(length + n * len(cuts), dtype=torch.bool)
        for j, c in enumerate(cuts):
            keep[c + j * n:c + (j + 1) * n] = False
        self.call_context().put(f"{self.key}:slot", (0, length + n * len(cuts), keep.nonzero().squeeze(1)))

    def _extend_per_token(self, kw: dict[str, Any], batch: int, length: int, k: int) -> None:
        n = self.n
        if kw.get("attention_mask") is not None:
            kw["attention_mask"] = soft.ones_mask(kw["attention_mask"], k, n)
        tt = kw.get("token_type_ids")
        if tt is not None:
            kw["token_type_ids"] = soft.insert_cols(tt, k, tt[:, max(k - 1, 0):max(k - 1, 0) + 1].expand(-1, n))
        pos = kw.get("position_ids")
        if pos is not None:
            if pos.dim() != 2:
                raise ConfigError(f"soft prompts need 2-D position_ids (batch, length); got {pos.dim()}-D.")
            start = pos[:, k - 1:k] + 1 if k > 0 else pos[:, :1]
            kw["position_ids"] = torch.cat([pos[:, :k], start + torch.arange(n, device=pos.device),
                                            pos[:, k:] + n], dim=1)
        labels = kw.get("labels")
        if isinstance(labels, torch.Tensor) and labels.dim() >= 2 and labels.shape[:2] == (batch, length):
            ignore = torch.full((batch, n, *labels.shape[2:]), -100, dtype=labels.dtype, device=labels.device)
            kw["labels"] = soft.insert_cols(labels, k, ignore)
        for name in SPAN_INPUTS:
            v = kw.get(name)
            if isinstance(v, torch.Tensor):
                kw[name] = torch.where(v >= k, v + n, v)

    def forward_post(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        slot = self.call_context().pop(f"{self.key}:slot")
        if slot is None or not self.strip_outputs or not isinstance(out, dict):
            return out
        k, total, keep = slot
        for name in SEQ_OUTPUTS:
            v = out.get(name)
            if isinstance(v, torch.Tensor) and v.dim() >= 3 and v.shape[1] == total:
                out[name] = self._cut(v, k, keep)
        for name in SPAN_OUTPUTS:
            v = out.get(name)
            if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] == total:
                out[name] = self._cut(v, k, keep)
        hs = out.get("hidden_states")
        if isinstance(hs, tuple):
            out["hidden_states"] = tuple(
                self._cut(h, k, keep) if isinstance(h, torch.Tensor) and h.dim() == 3 and h.shape[1] == total
                else h for h in hs)
        return out

    def _cut(self, t: torch.Tensor, k: int, keep: torch.Tensor | None) -> torch.Tensor:
        """`t` without the virtual tokens' columns (at k, or all but `keep` in a packed row)."""
        if keep is not None:
            return t.index_select(1, keep.to(t.device))
        return torch.cat([t[:, :k], t[:, k + self.n:]], dim=1)



class VirtualEmbedding(DeltaLayer):
    """On the input embedding table: ids >= vocab_size are looked up in the virtual embeddings that
    the input layer left in the call context (``<key>:table``)."""

    def __init__(self, key: str):
        super().__init__()
        self.key = key

    def forward_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        ids = args[0] if args else kwargs["input"]
        virtual = ids >= module.num_embeddings
        if not bool(virtual.any()):
            return args, kwargs
        self.call_context().put(f"{self.key}:lookup", (virtual, (ids - module.num_embeddings).clamp(min=0)))
        clean = ids.masked_fill(virtual, 0)
        return ((clean, *args[1:]), kwargs) if args else (args, {**kwargs, "input": clean})

    def forward_post(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        ctx = self.call_context()
        lookup = ctx.pop(f"{self.key}:lookup")
        if lookup is None:
            return out
        virtual, index = lookup
        table = ctx.pop(f"{self.key}:table")
        if table is None:
            raise ConfigError(f"input ids reach past the vocabulary ({module.num_embeddings}) but no "
                              f"virtual tokens were inserted by this call: pass token ids below "
                              f"{module.num_embeddings}.")
        if int(index.max()) >= table.shape[0]:
            raise ConfigError(f"input ids reach past the vocabulary ({module.num_embeddings}) and the "
                              f"{table.shape[0]} virtual tokens: check the tokenizer and the model.")
        picked = table[index.clamp(max=table.shape[0] - 1)].to(out.dtype)
        return torch.where(virtual.unsqueeze(-1), picked, out)


class CrossMask(DeltaLayer):
    """On an encoder-decoder's decoder: the encoder mask gets the virtual tokens' columns too."""

    def __init__(self, n: int, insert_at: int):
        super().__init__()
        self.n, self.insert_at = n, insert_at

    def forward_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kw = soft.bind(module, args, kwargs)
        states, mask = kw.get("encoder_hidden_states"), kw.get("encoder_attention_mask")
        if states is None or mask is None or mask.dim() != 2 or mask.shape[1] + self.n != states.shape[1]:
            return args, kwargs
        kw["encoder_attention_mask"] = soft.ones_mask(mask, min(self.insert_at, mask.shape[1]), self.n)
        return (), kw


def attach(delta: Delta, model: nn.Module, make: soft.Maker) -> VirtualTokens:
    """Add the input layer (built by ``make(host, key)``), the embedding layer and, on encoder-decoders,
    the cross-mask layer to `delta`."""
    key = f"{delta.name}:virtual"
    if soft.is_encoder_decoder(model):
        encoder, decoder = model.get_encoder(), model.get_decoder()
        host_path = soft.module_path(model, encoder)
        layer = make(encoder, key)
        delta.add_layer(soft.module_path(model, decoder), CrossMask(layer.n, layer.insert_at))
        delta.add_layer(host_path, layer)
    else:  # named as the model's, run on its backbone (whoever calls it)
        encoder, inner = None, soft.backbone(model)
        layer = make(inner, key)
        delta.add_layer("", layer, site=soft.module_path(model, inner))
    delta.add_layer(soft.input_embedding(model, encoder)[0], VirtualEmbedding(key))
    return layer
