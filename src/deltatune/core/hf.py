"""What Hugging Face code calls on a model (Trainer, TRL, peft users' scripts), done for the
wrapped model rather than for the base alone.

A DeltaModel forwards unknown attributes to its base model, so without these a Hugging Face
method would silently act on the base only: ``save_pretrained`` would write the base without
the delta, ``num_parameters(only_trainable=True)`` would count 0. Each name here either does the
right thing for base + deltas or refuses with the deltatune call to use.

The class: Trainer keeps only the dataset columns that ``model.forward`` names and finds label
names in the forward of the model's *class*, and it saves a model through ``save_pretrained`` only
if it is a ``PreTrainedModel`` (else it writes the whole state dict, base included). So each base
class gets a DeltaModel subclass (``typed_class``) whose ``forward`` shows the base's parameters
and which, for a Hugging Face base, is also a ``PreTrainedModel``: every name that class defines
and DeltaModel does not is forwarded to the base (as DeltaModel's ``__getattr__`` does), except
``torch.nn.Module``'s own methods (``to``, ``train``, ... act on base + deltas).
"""
from __future__ import annotations

import functools
import inspect
import os
from typing import Any

import torch.nn as nn

from ..errors import ConfigError

# transformers' own adapter API (integrations/peft.py): a second mechanism beside deltatune's deltas
_HF_ADAPTER_API = {
    "load_adapter": "dt.load(model, path) or dm.add(name, config)",
    "add_adapter": "dm.add(name, config)",
    "enable_adapters": "dm.activate(name, ...)",
    "disable_adapters": "`with dm.disabled():`",
    "delete_adapter": "dm.remove(name)",
    "active_adapters": "dm.active",
    "active_adapter": "dm.active",
    "get_adapter_state_dict": "dm.get_delta(name).delta_state_dict()",
}


class HFSurface:
    """Mixed into DeltaModel: the Hugging Face / peft names, for base + deltas."""

    # -- counts --------------------------------------------------------------------------------------
    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters of base + deltas (``only_trainable``: the deltas' trainable ones)."""
        skip: set[int] = set()
        if exclude_embeddings:
            skip = {id(p) for m in self.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
        return sum(p.numel() for p in self.parameters()
                   if id(p) not in skip and (p.requires_grad or not only_trainable))

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes of base + deltas' parameters (and buffers), as transformers reports a model's."""
        tensors = [*self.parameters(), *(self.buffers() if return_buffers else ())]
        return sum(t.nelement() * t.element_size() for t in tensors)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameters, as peft's ``PeftModel`` reports them."""
        return self.num_parameters(only_trainable=True), self.num_parameters()

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    # -- saving --------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, *, format: str = "hf",
                        name: str | None = None, is_main_process: bool = True,
                        state_dict: dict | None = None, push_to_hub: bool = False,
                        safe_serialization: bool = True, **kwargs: Any) -> None:
        """The deltas (not the base), in a format ``dt.load`` reads: ``dm.save(path, name, format)``.

        ``format="hf"`` (default): one ``model.safetensors`` under the wrapper's state-dict names,
        what Trainer resumes from (core/hfsave.py); ``"deltatune"``: ``dm.save``'s layout;
        ``"peft"``: peft's adapter directory. Arguments that would change what is written (a
        ``state_dict``, unsafe serialization, pushing, unknown options) are refused."""
        if state_dict is not None:
            raise ConfigError("save_pretrained(state_dict=...) would write those tensors, not the deltas: "
                              "deltatune saves each delta's own tensors; call dm.save_pretrained(path).")
        if not safe_serialization:
            raise ConfigError("deltatune saves safetensors only (never pickles): drop safe_serialization=False.")
        if push_to_hub:
            self.push_to_hub()
        if kwargs:
            raise ConfigError(f"save_pretrained() does not take {sorted(kwargs)} for a DeltaModel: it saves "
                              f"the deltas with dm.save(path, name=None, format='deltatune'|'peft').")
        if is_main_process:
            self.save(str(save_directory), name=name, format=format)

    @property
    def _keys_to_ignore_on_save(self) -> list[str]:
        """The base's state-dict names: no save writes them (Trainer, when it loads a checkpoint
        with ``strict=False``, reads these as expected-missing rather than warning about each)."""
        return [f"model.{k}" for k in self.model.state_dict()]

    def push_to_hub(self, *args: Any, **kwargs: Any) -> None:
        raise ConfigError("deltatune does not upload (this library runs offline): dm.save(path), then "
                          "upload the directory with huggingface_hub's upload_folder.")

    # -- peft users' habits ----------------------------------------------------------------------
    def merge_and_unload(self) -> nn.Module:
        """peft's name for ``unwrap(merge=True)``: the base model with the active deltas folded in."""
        return self.unwrap(merge=True)

    def disable_adapter(self):
        """peft's name for ``disabled()`` (a context manager)."""
        return self.disabled()

    def set_adapter(self, name: str) -> None:
        """peft's name for ``activate(name)``."""
        self.activate(name)



def refused(name: str) -> Any:
    """For a name of transformers' own adapter API reached through the wrapper: a callable that
    refuses (``hasattr`` stays true and harmless, a call names the deltatune way); else None."""
    if name not in _HF_ADAPTER_API:
        return None

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise ConfigError(f"{name}() is transformers' own adapter API, which would run beside "
                          f"deltatune's deltas: use {_HF_ADAPTER_API[name]}.")
    return refuse


#: DeltaModel.forward's own keywords (Trainer keeps a dataset column only if forward names it)
_OWN = ("deltas", "task_ids")


@functools.cache
def typed_class(base: type, wrapper: type) -> type:
    """A subclass of `wrapper` (DeltaModel) made for the base class `base`: its ``forward`` shows
    `base`'s forward parameters (plus ``deltas=`` and ``task_ids=``), and for a Hugging Face base it is also a
    ``PreTrainedModel`` whose names act on the base (module docstring)."""
    namespace: dict[str, Any] = {"__module__": wrapper.__module__}
    forward = _typed_forward(base, wrapper)
    if forward is not None:
        namespace["forward"] = forward
    bases: tuple[type, ...] = (wrapper,)
    pretrained = _pretrained_class()
    if pretrained is not None and issubclass(base, pretrained):
        bases = (wrapper, pretrained)
        namespace.update(_forwarders(base, wrapper, pretrained))
    if len(namespace) == 1:
        return wrapper
    return type(f"{wrapper.__name__}For{base.__name__}", bases, namespace)


def _typed_forward(base: type, wrapper: type) -> Any:
    params = list(inspect.signature(base.forward).parameters.values())
    if any(p.name in _OWN for p in params):
        return None  # a name is taken: keep the generic signature
    own = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in _OWN]
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    signature = inspect.Signature(params[:at] + own + params[at:])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return wrapper.forward(self, *args, **kwargs)

    forward.__signature__ = signature
    forward.__doc__ = wrapper.forward.__doc__
    return forward


def _pretrained_class() -> type | None:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return PreTrainedModel


class _Forward:
    """A name of PreTrainedModel's classes, read from the wrapped base model (a non-data
    descriptor: an attribute set on the wrapper itself still wins, as with ``__getattr__``)."""

    def __init__(self, name: str, base: type):
        self.name, self.base = name, base

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return getattr(self.base, self.name)
        return getattr(obj.model, self.name)


def _forwarders(base: type, wrapper: type, pretrained: type) -> dict[str, Any]:
    ours = {n for c in wrapper.__mro__ if c not in (nn.Module, object) for n in vars(c)}
    names = {n for c in pretrained.__mro__ if c not in (nn.Module, object) for n in vars(c)}
    out: dict[str, Any] = {}
    for n in sorted(names - ours):
        if n.startswith("__") and n.endswith("__"):
            continue
        if n in _HF_ADAPTER_API:
            out[n] = property(lambda self, n=n: refused(n))
        elif n in vars(nn.Module):
            out[n] = vars(nn.Module)[n]  # to / train / half ...: the whole wrapper, not the base
        else:
            out[n] = _Forward(n, base)
    return out
