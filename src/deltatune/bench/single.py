"""One method on one task (``deltatune train``) and scoring a saved result (``deltatune eval``).

``train`` saves what it trained into OUT: the delta(s) in deltatune's format (only their tensors),
or for ``full`` fine-tuning the whole model (``save_pretrained``), plus ``train_result.json`` (the
run's record: metrics, curve, budget, model and task) that ``eval`` reads for its defaults.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.state import CONFIG_FILE, INDEX_FILE, atomic_write
from ..errors import CheckpointError
from .checkpoint import Checkpointer
from .data import by_length, dev_indices, encode, pad_id
from .loop import accelerator, score_model
from .methods import parse_method
from .models import is_tiny, load_model, load_tiny, max_positions
from .suite import Runner, SuiteConfig
from .tasks import parse_task

RESULT_FILE = "train_result.json"
CHECKPOINT_DIR = "checkpoint"


def train_one(cfg: SuiteConfig, task_spec: str, method: str, seed: int, out: str,
              checkpoint_every: int = 0, restart: bool = False, stop_after: int | None = None) -> dict[str, Any]:
    """Train, score on dev, save into `out`; returns the run's record.

    ``checkpoint_every`` N > 0: checkpoint into ``out/checkpoint`` every N steps, and resume from
    there when it holds this run's checkpoint (``restart``: ignore it). ``stop_after``: stop after
    that many steps as if killed (``TrainingStopped``), to test resuming."""
    from tqdm import tqdm

    from transformers.utils import logging

    logging.disable_progress_bar()
    runner = Runner(cfg)
    task, spec = parse_task(task_spec), parse_method(method)
    key = runner.key(task, spec, seed)
    ckpt = None
    if checkpoint_every > 0 or stop_after is not None:
        ckpt = Checkpointer(Path(out) / CHECKPOINT_DIR, checkpoint_every, key, stop_after, resume=not restart)
    with tqdm(total=cfg.budget.steps, desc=f"{spec.label} {task.name}", disable=runner.quiet()) as bar:
        record, built = runner.train(task, spec, seed, progress=bar, ckpt=ckpt)
    record = {**runner.base_record(task, spec, seed, key), "status": "ok", **record}
    if runner.acc.is_main_process:
        root = Path(out)
        if built.delta is not None:
            built.delta.save(root)
            record["saved"] = "delta"
        else:
            built.model.save_pretrained(root)
            if hasattr(built.tokenizer, "save_pretrained"):
                built.tokenizer.save_pretrained(root)
            record["saved"] = "full_model"
        atomic_write(root / RESULT_FILE, json.dumps(record, indent=2, sort_keys=True).encode())
    runner.acc.free_memory()
    return record


def read_result(path: Path) -> dict[str, Any]:
    f = path / RESULT_FILE
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}


def load_saved(path: Path, model: str | None, num_labels: int):
    """(model, tokenizer) for a saved delta (onto its base) or a saved fully fine-tuned model."""
    if (path / CONFIG_FILE).exists() or (path / INDEX_FILE).exists():
        from ..core.state import load

        base, tok = load_model(model, num_labels, seed=0)
        return load(base, path), tok
    if (path / "config.json").exists():
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging

        logging.disable_progress_bar()
        net = AutoModelForSequenceClassification.from_pretrained(path)
        if is_tiny(model):
            return net, load_tiny(model, num_labels, 0)[1]
        has_tok = any((path / f).exists() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))
        return net, (AutoTokenizer.from_pretrained(path) if has_tok else load_model(model, num_labels)[1])
    raise CheckpointError(f"{path} holds neither a saved delta ({CONFIG_FILE}) nor a model (config.json).")


def eval_saved(path: str, task_spec: str | None = None, model: str | None = None, dev_size: int = 0,
               max_length: int | None = None, batch_size: int = 64, device: str = "auto",
               mixed_precision: str = "no", data_dir: str | None = None) -> dict[str, Any]:
    """Score a saved delta or model on a task's dev split; returns {task, metric, metrics, n}."""
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"{root} does not exist.")
    info = read_result(root)
    task_spec = task_spec or info.get("task_spec") or info.get("task")
    if not task_spec:
        raise CheckpointError(f"{root} has no {RESULT_FILE}: pass --task.")
    task = parse_task(task_spec)
    model = model or _model_arg(info.get("model"))
    net, tok = load_saved(root, model, task.num_labels)
    length = max_length or info.get("budget", {}).get("max_length", 128)
    length = min(length, max_positions(net) or length)
    dev = task.read("dev", data_dir)
    data = by_length(encode(tok, dev.subset(dev_indices(len(dev), dev_size)), length, task.regression))
    metrics = score_model(net, data, task, batch_size, pad_id(tok), accelerator(device, mixed_precision))
    return {"task": task.name, "metric": task.metric, "metrics": metrics, "n": len(data),
            "path": str(root), "model": model or info.get("model")}


def _model_arg(label: str | None) -> str | None:
    from ..models import DEFAULT_MODEL

    return None if label in (None, DEFAULT_MODEL) else label

