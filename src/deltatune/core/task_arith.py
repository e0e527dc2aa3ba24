"""Task arithmetic: deltas combined as weight updates (``DeltaModel.add_weighted``).

A mergeable delta's task vector is the dense change it makes to each base tensor it touches,
dW = merged - base (read by merging it into the live model, then unmerging exactly). Adding,
subtracting (negation: "forgetting" a task) and scaling are weights (1, -1, lambda); the merging
strategies peft users know combine the task vectors tau_i of one tensor:

- ``linear``: sum_i w_i tau_i.
- ``magnitude_prune``: each tau_i keeps its top ``density`` fraction of entries by magnitude, then
  the weighted sum (peft's ``magnitude_prune``).
- ``ties`` (Yadav et al. 2023): the same trim, a sign per entry elected by the sign of the sum of
  the trimmed tau_i, and the weighted entries that agree with it averaged (disjoint mean).
- ``dare`` (Yu et al. 2024): each tau_i keeps a random ``density`` fraction of its entries (seeded),
  rescaled by 1/density, then the weighted sum.
- ``dare_ties``: DARE's random drop and rescale, then TIES's sign election and disjoint mean.

These are peft's definitions (``peft.utils.merge_utils``), on dense updates. The result of a
method without a combination of its own is held by the registered method that can hold any dense
updates (``Delta.from_updates``: partial tuning's differences), so it saves, loads and merges like
any delta. LoRA combines in factor space first (methods/_lora_merge.py) and uses these functions
for its dense strategies.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..errors import ConfigError, MergeError

if TYPE_CHECKING:
    from .delta import Delta

#: strategies on dense task vectors
DENSE = ("linear", "magnitude_prune", "ties", "dare", "dare_ties")


def check_options(how: str, density: float, allowed: tuple[str, ...] = DENSE) -> None:
    if how not in allowed:
        raise ConfigError(f"how={how!r} is unknown here: use one of {', '.join(allowed)}.")
    if not (isinstance(density, (int, float)) and not isinstance(density, bool) and 0 < density <= 1):
        raise ConfigError(f"density={density!r} is invalid: expected a fraction in (0, 1].")


def combine(tau: list[torch.Tensor | None], weights: list[float], how: str, density: float = 0.5,
            gen: torch.Generator | None = None) -> torch.Tensor:
    """One tensor's combination of the task vectors `tau` (None: that delta leaves it alone)."""
    like = next(t for t in tau if t is not None)
    stack = torch.stack([t if t is not None else torch.zeros_like(like) for t in tau])
    w = torch.tensor(weights, dtype=stack.dtype, device=stack.device).view(-1, *[1] * like.dim())
    if how in ("magnitude_prune", "ties"):
        stack = _trim(stack, density)
    elif how in ("dare", "dare_ties"):
        keep = torch.rand(stack.shape, generator=gen, dtype=stack.dtype) < density
        stack = stack * keep.to(stack.device) / density
    if how in ("ties", "dare_ties"):
        elected = torch.where(stack.sum(0) >= 0, 1.0, -1.0).to(stack.dtype)
        agree = (stack.sign() == elected).to(stack.dtype)
        return (w * stack * agree).sum(0) / agree.sum(0).clamp(min=1.0)
    return (w * stack).sum(0)


def _trim(stack: torch.Tensor, density: float) -> torch.Tensor:
    """Each row keeps its top ``density`` fraction of entries by magnitude (the rest 0)."""
    flat = stack.reshape(len(stack), -1)
    k = int(density * flat.shape[1])
    trimmed = torch.zeros_like(flat)
    if k > 0:
        idx = flat.abs().topk(k, dim=1).indices
        trimmed.scatter_(1, idx, flat.gather(1, idx))
    return trimmed.view_as(stack)


@torch.no_grad()
def dense_updates(delta: Delta, model: nn.Module) -> dict[str, torch.Tensor]:
    """``{parameter name: merged - base}`` for every base tensor `delta` changes (in float64)."""
    if not delta.mergeable:
        raise MergeError(f"method {delta.config.method!r} has no weighted combination into one delta: its "
                         f"layers change the computation, not the weights (nothing to add up). Run such "
                         f"deltas together with activate(..., composition='average', weights=[...]).")
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    touched = {id(t): t for path in delta.paths() for t in model.get_submodule(path).parameters(recurse=False)}
    before = {k: t.detach().double().clone() for k, t in touched.items()}
    delta.merge(model, exact=True)
    try:
        after = {k: t.detach().double().clone() for k, t in touched.items()}
    finally:
        delta.unmerge(model)
    return {names[k]: after[k] - before[k] for k in touched if not torch.equal(after[k], before[k])}


def dense_weighted(name: str, deltas: list[Delta], weights: list[float], model: nn.Module,
                   how: str = "linear", density: float = 0.5, seed: int = 0, **options) -> Delta:
    """The combination of `deltas`' task vectors as a new delta of the dense-update holder."""
    from .registry import dense_holder

    if options:
        raise ConfigError(f"add_weighted() options {sorted(options)} do not apply to "
                          f"{deltas[0].config.method!r} deltas (dense task vectors take how=, density=, "
                          f"seed=; rank= is for LoRA).")
    check_options(how, density)
    taus = [dense_updates(d, model) for d in deltas]
    order = [n for n, _ in model.named_parameters()]
    gen = torch.Generator().manual_seed(seed)  # the random drops, drawn in parameter order
    combined = {n: combine([t.get(n) for t in taus], weights, how, density, gen)
                for n in order if any(n in t for t in taus)}
    combined = {n: u for n, u in combined.items() if bool(u.any())}  # a zero change is no change
    params = dict(model.named_parameters())
    updates = {n: u.to(params[n].dtype) for n, u in combined.items()}
    return dense_holder().from_updates(name, updates, model, heads=sorted({h for d in deltas for h in d.head_names(model)}))
