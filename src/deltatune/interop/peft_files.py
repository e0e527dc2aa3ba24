"""The files of a peft adapter directory: ``adapter_config.json`` and ``adapter_model.safetensors``
(or the older ``adapter_model.bin``, read only through ``torch.load(weights_only=True)``)."""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..core.state import atomic_write
from ..errors import CheckpointError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"


def detect(root: Path) -> bool:
    """Whether `root` is a peft adapter directory (what ``deltatune.load`` asks every format)."""
    return (root / CONFIG_FILE).is_file()


def read_config(root: Path) -> dict[str, Any]:
    try:
        data = json.loads((root / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{root / CONFIG_FILE} is not a readable JSON file ({e}).") from e
    if not isinstance(data, dict) or not isinstance(data.get("peft_type"), str):
        raise CheckpointError(f"{root / CONFIG_FILE} has no 'peft_type': not a peft adapter config.")
    return data


def read_weights(root: Path) -> dict[str, torch.Tensor]:
    if (root / WEIGHTS_FILE).exists():
        try:
            return st_load((root / WEIGHTS_FILE).read_bytes())
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{root / WEIGHTS_FILE} is not a valid safetensors file ({e}).") from e
    if not (root / WEIGHTS_BIN).exists():
        raise CheckpointError(f"{root} holds {CONFIG_FILE} but neither {WEIGHTS_FILE} nor {WEIGHTS_BIN}.")
    try:
        data = torch.load(root / WEIGHTS_BIN, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{root / WEIGHTS_BIN} cannot be read as plain tensors (weights-only "
                              f"load refused it: {str(e).splitlines()[0]}).") from e
    if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise CheckpointError(f"{root / WEIGHTS_BIN} is not a dict of named tensors.")
    return data


def write_adapter(root: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Weights first, config last (each atomically): a reader that sees the config sees its weights."""
    atomic_write(root / WEIGHTS_FILE, st_save(tensors, metadata={"format": "pt"}))
    atomic_write(root / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True).encode())
