"""deltatune: parameter-efficient fine-tuning (delta-tuning) of pretrained transformers."""
from __future__ import annotations

from .core.compose import Average, Composition, Fuse, Parallel, Stack
from .core.config import DeltaConfig
from .core.delta import Delta
from .core.layer import DeltaLayer
from .core.model import DeltaModel, wrap
from .core.registry import available_methods, config_from_dict, get_method, register
from .core.loading import load
from .errors import CheckpointError, ConfigError, DeltaError, DeltaNotFoundError, MergeError, TargetError
from .quant import dequantize, memory_report, merge_quantized, quantize
from .version import __version__
# every method's config class, explicitly (importing them registers the methods)
from .methods.adalora import AdaLoRAConfig
from .methods.adamix import AdaMixConfig
from .methods.adapter import AdapterConfig
from .methods.bitfit import BitFitConfig
from .methods.compacter import CompacterConfig
from .methods.delta_lora import DeltaLoRAConfig
from .methods.diff_pruning import DiffPruningConfig
from .methods.dylora import DyLoRAConfig
from .methods.fusion import FusionConfig
from .methods.ia3 import IA3Config
from .methods.increlora import IncreLoRAConfig
from .methods.layernorm import LayerNormConfig
from .methods.loha import LoHaConfig
from .methods.lokr import LoKrConfig
from .methods.lora import LoRAConfig
from .methods.lora_fa import LoRAFAConfig
from .methods.loraprune import LoRAPruneConfig, prune_model
from .methods.lst import LSTConfig
from .methods.lt_sft import LTSFTConfig
from .methods.mam import MAMConfig
from .methods.mask import MaskConfig
from .methods.partial import PartialConfig
from .methods.prefix import PrefixConfig
from .methods.prompt import PromptConfig
from .methods.ptuning import PTuningConfig
from .methods.qalora import QALoRAConfig
from .methods.sparse_adapter import SparseAdapterConfig
from .methods.unipelt import UniPELTConfig
from .methods.vera import VeRAConfig
from .lorahub import LoraHubResult, compose_lorahub
from . import interop  # noqa: F401  (registers the peft checkpoint loader and saver)



def __getattr__(name: str):
    if name == "DeltaCallback":  # imports transformers' Trainer machinery: only when asked for
        from .callback import DeltaCallback

        return DeltaCallback
    raise AttributeError(f"module 'deltatune' has no attribute {name!r}")


__all__ = [
    "Average", "Composition", "Fuse", "Parallel", "Stack",
    "CheckpointError", "ConfigError", "Delta", "DeltaCallback", "DeltaConfig", "DeltaError", "DeltaLayer",
    "DeltaModel", "DeltaNotFoundError", "MergeError", "TargetError", "__version__",
    "available_methods", "config_from_dict", "dequantize", "get_method", "load", "memory_report",
    "merge_quantized", "quantize", "register", "wrap",
    "AdaLoRAConfig", "AdaMixConfig", "AdapterConfig", "BitFitConfig", "CompacterConfig",
    "DiffPruningConfig", "FusionConfig", "IA3Config", "LayerNormConfig", "LoHaConfig", "LoKrConfig",
    "LoRAConfig", "LSTConfig", "LTSFTConfig", "MAMConfig", "MaskConfig", "PartialConfig",
    "PrefixConfig", "PromptConfig", "PTuningConfig", "SparseAdapterConfig", "UniPELTConfig",
    "VeRAConfig", "DeltaLoRAConfig", "DyLoRAConfig", "IncreLoRAConfig", "LoRAFAConfig", "LoRAPruneConfig",
    "QALoRAConfig", "prune_model", "compose_lorahub", "LoraHubResult",
]

