"""The peft mappings deltatune knows (filled by peft_methods / peft_adapters / peft_prompts at
import), looked up by peft type when loading and by deltatune method when saving."""
from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError, ConfigError
from .peft_schema import PeftMapping, tested

MAPPINGS: dict[str, PeftMapping] = {}


def register_peft(mapping: PeftMapping) -> None:
    MAPPINGS[mapping.peft_type] = mapping


def mapping_for_type(peft_type: str, root: Path) -> PeftMapping:
    if peft_type not in MAPPINGS:
        raise CheckpointError(
            f"{root} is a peft {peft_type} adapter; deltatune converts peft types "
            f"{', '.join(sorted(MAPPINGS))} (checked against peft {tested()})."
        )
    return MAPPINGS[peft_type]


def mapping_for_method(method: str) -> PeftMapping:
    for m in MAPPINGS.values():
        if m.method == method:
            return m
    known = ", ".join(sorted(m.method for m in MAPPINGS.values()))
    raise ConfigError(f"method {method!r} has no peft equivalent that deltatune can write; "
                      f"peft format saves: {known}. Save it in deltatune's own format instead.")
