"""deltatune: parameter-efficient fine-tuning (delta-tuning) of pretrained transformers."""
from __future__ import annotations

from .core.compose import Average, Composition, Fuse, Parallel, Stack
from .core.config import DeltaConfig
from .core.delta import Delta
from .core.layer import DeltaLayer
from .core.model import DeltaModel, wrap
from .core.registry import available_methods, config_from_dict, get_method, register
from .core.state import load
from .errors import CheckpointError, ConfigError, DeltaError, DeltaNotFoundError, MergeError, TargetError
from .quant import dequantize, memory_report, merge_quantized, quantize
from .version import __version__
from . import interop  # noqa: F401  (registers the peft checkpoint loader and saver)

__all__ = [
    "Average", "Composition", "Fuse", "Parallel", "Stack",
    "CheckpointError", "ConfigError", "Delta", "DeltaConfig", "DeltaError", "DeltaLayer",
    "DeltaModel", "DeltaNotFoundError", "MergeError", "TargetError", "__version__",
    "available_methods", "config_from_dict", "dequantize", "get_method", "load", "memory_report",
    "merge_quantized", "quantize", "register", "wrap",
]


def __getattr__(name: str):
    """Config classes by name (``deltatune.LoRAConfig``), found through the registry."""
    from .core.registry import method_specs

    for spec in method_specs():
        if spec.config_cls.__name__ == name:
            return spec.config_cls
    raise AttributeError(f"module 'deltatune' has no attribute {name!r}")
