"""LoRAHub (Huang et al. 2023, "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA
Composition"): weights w for existing LoRA deltas, found gradient-free on a few examples of a new
task; the result is an ordinary ``lora`` delta.

The composed module update is (sum_i w_i B_i)(sum_i w_i A_i) scaled as the sources are (the paper's
element-wise composition of the factors, not the sum of the updates), so every source must have the
same rank and scaling at each module it adapts. The objective is the paper's: the model's mean loss
on the examples plus ``l1`` times the mean |w_i| (its code's regularizer, 0.05), minimised by
nevergrad's ``NGOpt`` (the paper's choice) from w = 0 within [-bound, bound] (1.5) for ``budget``
evaluations (40). Each evaluation writes the candidate factors into the new delta and runs the
examples without gradients, so nothing but that delta's tensors is ever written.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .core.delta import key_to_path
from .core.layer import ParamCopy
from .errors import ConfigError, MergeError


@dataclass
class LoraHubResult:
    """What the search found: ``delta`` is the name of the new ``lora`` delta it added."""

    delta: str
    sources: list[str]
    weights: list[float]
    loss: float  # the objective at ``weights`` (mean example loss + l1 term)
    history: list[float] = field(default_factory=list)  # the objective of every evaluation, in order


def compose_lorahub(dm: Any, name: str, sources: list[str], examples: Iterable[dict[str, Any]] | dict[str, Any],
                    budget: int = 40, l1: float = 0.05, bound: float = 1.5, seed: int = 0,
                    optimizer: str = "NGOpt", loss: Callable[[Any, dict[str, Any]], torch.Tensor] | None = None
                    ) -> LoraHubResult:
    """Search the weights of `sources` (LoRA deltas of `dm`) on `examples` (batches the model takes,
    with labels; or one batch) and add the composed delta `name` (inactive; the active deltas are
    as before). ``loss(model, batch)``: the task loss (default: the model output's ``loss``)."""
    try:
        import nevergrad as ng
    except ImportError as e:  # pragma: no cover - the multitask extra
        raise ImportError("LoRAHub's search needs nevergrad: pip install 'deltatune[multitask]'") from e
    batches = [examples] if isinstance(examples, dict) else list(examples)
    _check_search(sources, batches, budget, l1, bound)
    deltas = [dm.get_delta(n) for n in sources]
    paths, heads = _check_sources(deltas, dm.model)
    new = dm.add(name, _config(deltas[0], paths, heads))
    loss = loss or _output_loss
    saved = dm.composition if dm.active else None
    history: list[float] = []

    def objective(w) -> float:
        _write(new, deltas, [float(v) for v in w], dm.model)
        with torch.no_grad():
            value = sum(float(loss(dm, b)) for b in batches) / len(batches)
        value += l1 * float(sum(abs(float(v)) for v in w)) / len(w)
        history.append(value)
        return value

    was_training = dm.model.training  # the base's mode is the one that matters (dropout)
    dm.eval()
    dm.activate(name)
    try:
        param = ng.p.Array(init=[0.0] * len(deltas), lower=-bound, upper=bound)
        param.random_state.seed(seed)
        opt = ng.optimizers.registry[optimizer](parametrization=param, budget=budget)
        best = opt.minimize(objective)
        weights = [float(v) for v in best.value]
        final = objective(best.value)  # also leaves the delta holding the chosen factors
        history.pop()
    except BaseException:
        dm.remove(name)
        raise
    finally:
        if saved is not None:
            dm.activate(saved)
        elif name in dm.deltas:
            dm.activate()
        dm.train(was_training)
    return LoraHubResult(name, list(sources), weights, final, history)


def _output_loss(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    out = model(**batch)
    value = getattr(out, "loss", None) if not isinstance(out, dict) else out.get("loss")
    if value is None:
        raise ConfigError("the model gave no loss for an example batch: give the batches labels, or pass "
                          "loss=lambda model, batch: ... to compose_lorahub().")
    return value


def _check_search(sources: list[str], batches: list[Any], budget: int, l1: float, bound: float) -> None:
    if len(sources) < 2 or len(set(sources)) != len(sources):
        raise ConfigError(f"LoRAHub composes two or more distinct LoRA deltas; got sources={sources!r}.")
    if not batches or not all(isinstance(b, dict) for b in batches):
        raise ConfigError("examples must be a batch dict (input_ids, labels, ...) or a list of them, and not empty.")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ConfigError(f"budget={budget!r} is invalid: the number of evaluations, a positive integer (the paper: 40).")
    if not (isinstance(l1, (int, float)) and l1 >= 0):
        raise ConfigError(f"l1={l1!r} is invalid: a weight >= 0 for the mean |w| term (the paper: 0.05).")
    if not (isinstance(bound, (int, float)) and bound > 0):
        raise ConfigError(f"bound={bound!r} is invalid: the weights' range [-bound, bound], bound > 0 (the paper: 1.5).")


def _lora_layers(delta: Any) -> dict[str, Any]:
    return {key_to_path(k): lay for k, lay in delta.layers.items() if not isinstance(lay, ParamCopy)}


def _check_sources(deltas: list[Any], model: Any) -> tuple[list[str], list[str]]:
    from .methods.lora import LoRALayer

    for d in deltas:
        if d.config.method != "lora" or d.config.dora:
            raise MergeError(f"delta {d.name!r} is {d.config.method!r}{' with DoRA' if d.config.method == 'lora' else ''}: "
                             f"LoRAHub composes plain LoRA deltas (method='lora', dora=False).")
        odd = [p for p, lay in _lora_layers(d).items() if type(lay) is not LoRALayer or lay.lora_A0 is not None]
        if odd:
            raise MergeError(f"delta {d.name!r} has an initialisation-offset or special layer at {odd[0]} "
                             f"(PiSSA / OLoRA / LoftQ keep initial factors): LoRAHub composes the factors "
                             f"of plainly initialised LoRA deltas.")
    first = _lora_layers(deltas[0])
    for d in deltas[1:]:
        layers = _lora_layers(d)
        if layers.keys() != first.keys():
            diff = sorted(set(layers) ^ set(first))
            raise MergeError(f"LoRAHub composes deltas that adapt the same modules; {d.name!r} and "
                             f"{deltas[0].name!r} differ at {diff[0]}.")
        for p, lay in layers.items():
            if lay.lora_A.shape != first[p].lora_A.shape or lay.scaling != first[p].scaling:
                raise MergeError(f"at {p}, {d.name!r} has rank {lay.lora_A.shape[0]} and scaling {lay.scaling} "
                                 f"but {deltas[0].name!r} rank {first[p].lora_A.shape[0]} and scaling "
                                 f"{first[p].scaling}: LoRAHub sums the factors, so they must match.")
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    heads = sorted({h for d in deltas for h in d.head_names(model)})
    return sorted(first, key=order.__getitem__), heads


def _config(delta: Any, paths: list[str], heads: list[str]) -> Any:
    import re

    from .methods.lora import LoRAConfig

    cfg = delta.config
    layers = _lora_layers(delta)
    r = max(lay.lora_A.shape[0] for lay in layers.values())
    pattern = {re.escape(p): lay.lora_A.shape[0] for p, lay in layers.items() if lay.lora_A.shape[0] != r} or None
    return LoRAConfig(r=r, alpha=cfg.alpha, rslora=cfg.rslora, targets=paths, modules_to_save=heads,
                      rank_pattern=pattern, alpha_pattern=cfg.alpha_pattern, dropout=cfg.dropout)


@torch.no_grad()
def _write(new: Any, deltas: list[Any], w: list[float], model: Any) -> None:
    from .methods._lora_merge import combine_heads

    for path, layer in _lora_layers(new).items():
        parts = [_lora_layers(d)[path] for d in deltas]
        layer.lora_A.copy_(sum(wi * p.lora_A for wi, p in zip(w, parts)))
        layer.lora_B.copy_(sum(wi * p.lora_B for wi, p in zip(w, parts)))
    combine_heads(new, deltas, w, model)
