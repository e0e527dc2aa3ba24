"""Other libraries' checkpoint formats. Importing this package registers their loaders (used by
``deltatune.load`` on directories without a deltatune config) and savers (``save(format=...)``)."""
from . import peft_adapters, peft_format, peft_methods, peft_prompts  # noqa: F401

__all__ = ["peft_adapters", "peft_format", "peft_methods", "peft_prompts"]
