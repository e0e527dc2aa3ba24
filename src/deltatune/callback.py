"""DeltaCallback: what a deltatune training loop does each step, for transformers.Trainer / TRL.

Some methods need the loop's help: a schedule run after each optimizer step (AdaLoRA's budget,
the sparse methods' switch to their compact tensors, SparseAdapter's pruning) and an extra loss
term (``dm.regularization()``). Trainer knows neither, so ``Trainer(..., callbacks=
[DeltaCallback()])`` calls ``dm.step`` after every optimizer step, points the optimizer at the
new tensors when a step replaced them, and has the model add the regularization to its loss.
Without it such a delta is refused after a few training calls (core/model.py), never silently
left unscheduled.
"""
from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from .errors import ConfigError


class DeltaCallback(TrainerCallback):
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        dm = _delta_model(model)
        if optimizer is not None:  # Trainer's own optimizer has one rate: LoRA+'s ratio would be lost
            dm.check_optimizer(optimizer)
        needs = [n for n in dm.active if dm.get_delta(n).regularized]
        if needs and "forward" in vars(dm):
            raise ConfigError(
                f"this trainer replaced the model's forward (TRL's fused LM head computes its own loss), "
                f"so the regularization of {needs} cannot join the loss: train these deltas with "
                f"transformers.Trainer, `deltatune train`, or your own loop (loss + dm.regularization()).")
        dm.loss_adds_regularization = True
        self._version = dm.param_version

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                    **kwargs: Any) -> None:
        dm = _delta_model(model)
        dm.step(state.global_step - 1)
        if dm.param_version != self._version:
            self._version = dm.param_version
            _follow(optimizer, dm.trainable_parameters())

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        _delta_model(model).loss_adds_regularization = False


def _delta_model(model: Any) -> Any:
    from .core.model import DeltaModel

    if not isinstance(model, DeltaModel):
        raise ConfigError(f"DeltaCallback trains a DeltaModel, but the trainer holds a {type(model).__name__}: "
                          f"pass model=dm (the wrapper deltatune returned).")
    return model


def _follow(optimizer: Any, trainable: list[Any]) -> None:
    """The optimizer's groups keep the tensors still trained; the new ones join the first group
    (with fresh optimizer state), as a deltatune loop rebuilds its optimizer over them."""
    if optimizer is None:
        raise ConfigError("a delta replaced its trainable tensors, but the trainer passed no optimizer "
                          "to the callback: use `deltatune train` for this method.")
    keep = {id(p) for p in trainable}
    seen: set[int] = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in keep:
                optimizer.state.pop(p, None)
        group["params"] = [p for p in group["params"] if id(p) in keep]
        seen |= {id(p) for p in group["params"]}
    optimizer.param_groups[0]["params"].extend(p for p in trainable if id(p) not in seen)
