"""`deltatune convert SRC DST --to peft|deltatune`: rewrite a saved delta in the other format.

Converting needs the base model (module types, shapes and the fingerprint deltatune records): a
local model directory from ``--model``, else the peft config's ``base_model_name_or_path`` when that
is a local directory. The model class is the one the checkpoint names (deltatune's fingerprint,
peft's ``auto_mapping`` or ``task_type``), else the model directory's ``architectures``.
"""
from __future__ import annotations

import json
from pathlib import Path

# peft task types -> the transformers auto class peft's task model wraps
TASK_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification", "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel",
}


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a saved delta between deltatune and Hugging Face peft formats")
    p.add_argument("src", help="a saved deltatune delta or a peft adapter directory")
    p.add_argument("dst", help="the output directory")
    p.add_argument("--to", required=True, choices=("peft", "deltatune"), help="the output format")
    p.add_argument("--model", help="the base model's local directory (default: the peft config's "
                                   "base_model_name_or_path, when it is a local directory)")
    p.add_argument("--num-labels", type=int, help="classification labels of the base model's head")
    p.add_argument("--name", help="the delta to convert when SRC holds several (default: all)")
    p.set_defaults(func=run)


def run(args) -> int:
    import deltatune

    from ..errors import ConfigError

    src, dst = Path(args.src), Path(args.dst)
    if src.resolve() == dst.resolve():
        raise ConfigError("SRC and DST are the same directory: write the conversion somewhere else.")
    model = load_base(src, args.model, args.num_labels)
    dm = deltatune.load(model, src, name=args.name)
    dm.save(str(dst), name=args.name, format=args.to)
    print(f"converted {src} -> {dst} ({args.to}): deltas {', '.join(dm.deltas)} on "
          f"{type(dm.model).__name__}")
    return 0


def checkpoint_base(src: Path) -> tuple[str | None, str | None]:
    """(model class, model directory) that the checkpoint in `src` names, where it names them."""
    from ..core.state import CONFIG_FILE, INDEX_FILE
    from ..interop.peft_files import CONFIG_FILE as PEFT_CONFIG

    if (src / PEFT_CONFIG).exists() and not (src / CONFIG_FILE).exists():
        data = _json(src / PEFT_CONFIG)
        cls = (data.get("auto_mapping") or {}).get("base_model_class")
        return cls or TASK_CLASSES.get(data.get("task_type") or ""), data.get("base_model_name_or_path")
    if (src / INDEX_FILE).exists():
        names = _json(src / INDEX_FILE).get("deltas") or [""]
        src = src / names[0]
    if (src / CONFIG_FILE).exists():
        return (_json(src / CONFIG_FILE).get("base") or {}).get("class"), None
    return None, None


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_base(src: Path, model_dir: str | None, num_labels: int | None):
    from ..errors import ConfigError

    cls_name, named_dir = checkpoint_base(src)
    model_dir = model_dir or (named_dir if named_dir and Path(named_dir).is_dir() else None)
    if model_dir is None or not Path(model_dir).is_dir():
        raise ConfigError(f"converting {src} needs its base model: pass --model DIR (a local Hugging "
                          f"Face model directory; deltatune never downloads).")
    import transformers
    from transformers.utils import logging

    cls_name = cls_name or (_json(Path(model_dir) / "config.json").get("architectures") or [None])[0]
    cls = getattr(transformers, cls_name or "", None) or transformers.AutoModel
    kwargs = {"num_labels": num_labels} if num_labels else {}
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # a fresh head is expected: the delta holds its trained copy
    try:
        return cls.from_pretrained(model_dir, **kwargs)
    finally:
        logging.set_verbosity(verbosity)
