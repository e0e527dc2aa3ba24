"""Helpers of the sparse-method tests: deltas put into a trained-looking state, dense views."""
from __future__ import annotations

import torch

import deltatune as dt
from deltatune.core.delta import key_to_path


def randomize(delta, seed: int = 0, scale: float = 0.1) -> None:
    """Every trainable tensor of the delta gets random values (a stand-in for training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def make_compact(dm, name: str = "default", k: int | None = None, seed: int = 0):
    """Randomize the training form, switch to the compact form, randomize the kept values."""
    delta = dm.get_delta(name)
    method = delta.config.method
    if method == "mask":
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, lay in delta.compact_layers():
                for s in lay.scores.values():
                    s.copy_(torch.randn(s.shape, generator=g) * 0.01 + 0.007)
        delta.finalize()
        return delta
    randomize(delta, seed)
    if method == "lt_sft":
        delta.start_phase2(k)
    else:
        delta.finalize(k)
    randomize(delta, seed + 1)
    return delta


def sparse_dense_diffs(delta) -> dict[str, torch.Tensor]:
    """{'<module>.<param>': dense difference} of a compact diff_pruning / lt_sft delta."""
    out = {}
    for path, lay in delta.compact_layers():
        for n in lay.names:
            like = torch.zeros(lay.shapes[n])
            out[f"{path}.{n}"] = lay.sparse.dense(n, like).detach()
    return out


def config(method: str, **kw):
    return dt.config_from_dict({"method": method, **kw})


def base_params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def layer_path(key: str) -> str:
    return key_to_path(key)


def no_dropout(model):
    """Zero every dropout (modules and float attributes such as T5Attention.dropout)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        elif isinstance(getattr(m, "dropout", None), float):
            m.dropout = 0.0
    return model
