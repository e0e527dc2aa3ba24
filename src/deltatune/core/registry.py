"""The method registry: each method module registers its config and delta class. The core looks
methods up here by name and never branches on them."""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, did_you_mean
from .config import DeltaConfig
from .delta import Delta

FAMILIES = ("additive", "partial", "reparameterized", "hybrid")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type[DeltaConfig]
    delta_cls: type[Delta]
    family: str
    paper: str
    lr: float = 3e-3  # AdamW learning rate for short benchmark runs (the bench's default for it)


_REGISTRY: dict[str, MethodSpec] = {}
_loaded = False


def register(name: str, config_cls: type[DeltaConfig], delta_cls: type[Delta], *,
             family: str, paper: str = "", lr: float = 3e-3) -> None:
    """Make a method known by `name`. ``lr``: its learning rate for short runs (AdamW, warm-up then
    linear decay), which the bench uses unless a run gives one.

    The classes say what they are themselves (``Config.method = name``, ``Delta.config_cls =
    Config``); registering only checks that and records them, it changes no class."""
    if family not in FAMILIES:
        raise ValueError(f"family {family!r} must be one of {FAMILIES}")
    if name in _REGISTRY and _REGISTRY[name].delta_cls is not delta_cls:
        raise ValueError(f"method {name!r} is already registered")
    if config_cls.__dict__.get("method") != name:
        raise ValueError(f"{config_cls.__name__} must declare `method: ClassVar[str] = {name!r}`.")
    if delta_cls.__dict__.get("config_cls") is not config_cls:
        raise ValueError(f"{delta_cls.__name__} must declare `config_cls = {config_cls.__name__}`.")
    _REGISTRY[name] = MethodSpec(name, config_cls, delta_cls, family, paper, lr)


def dense_holder() -> type:
    """The delta class that holds any dense weight updates (task arithmetic's result for methods
    without a combination of their own): the registered class that defines ``from_updates``."""
    _load_builtin()
    found = [s.delta_cls for s in _REGISTRY.values() if "from_updates" in s.delta_cls.__dict__]
    if len(found) != 1:
        raise RuntimeError(f"exactly one registered method must define from_updates(); found {len(found)}")
    return found[0]


def _load_builtin() -> None:
    """Import every module of deltatune.methods once, so that they register themselves."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from .. import methods  # here, not at the top: the method modules import this one to register

    for info in pkgutil.iter_modules(methods.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{methods.__name__}.{info.name}")


def get_method(name: str) -> MethodSpec:
    _load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown method {name!r}.{did_you_mean(name, _REGISTRY)} "
            f"Registered methods: {', '.join(sorted(_REGISTRY))}."
        )
    return _REGISTRY[name]


def available_methods() -> list[str]:
    """Registry names of every method, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def method_specs() -> list[MethodSpec]:
    _load_builtin()
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


def config_from_dict(data: dict[str, Any]) -> DeltaConfig:
    """Build a method's config from a plain dict: ``{"method": "lora", "r": 8, ...}``."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a dict with a 'method' key, got {type(data).__name__}.")
    if "method" not in data:
        raise ConfigError(
            "config dict has no 'method' key; add one, e.g. {'method': 'lora', ...}. "
            f"Registered methods: {', '.join(available_methods())}."
        )
    return get_method(data["method"]).config_cls.from_dict(data)
