"""One method on one task (``deltatune train``) and scoring a saved result (``deltatune eval``).

``train`` saves what it trained into OUT: the delta(s) in deltatune's format (only their tensors),
or for ``full`` fine-tuning the whole model (``save_pretrained``), plus ``train_result.json`` (the
run's record: metrics, curve, budget, model and task) that ``eval`` and ``generate`` read for
their defaults (the task, hence its prompt template; the base model; the generation settings).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.state import CONFIG_FILE, INDEX_FILE, atomic_write
from ..errors import CheckpointError, ConfigError
from .checkpoint import Checkpointer
from .loop import accelerator, dev_scorer, score_model
from .methods import parse_method
from .models import GEN_CLASSES, is_tiny, load_model, max_positions, pad_with_eos
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
    if task.generative:  # how `generate` renders a prompt for this delta
        record["chat"] = isinstance(task.read("train", cfg.data_dir).prompts[0], list)
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


def load_saved(path: Path, model: str | None, task):
    """(model, tokenizer) for a saved delta (onto its base) or a saved fully fine-tuned model."""
    if (path / CONFIG_FILE).exists() or (path / INDEX_FILE).exists():
        from ..core.loading import load

        base, tok = load_model(model, task.num_labels, seed=0, kind=task.kind)
        return load(base, path), tok
    if (path / "config.json").exists():
        import transformers
        from transformers.utils import logging

        logging.disable_progress_bar()
        cls = GEN_CLASSES.get(task.kind, "AutoModelForSequenceClassification")
        net = getattr(transformers, cls).from_pretrained(path)
        if is_tiny(model):
            return net, load_model(model, task.num_labels, 0, task.kind)[1]
        has_tok = any((path / f).exists() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))
        tok = (pad_with_eos(transformers.AutoTokenizer.from_pretrained(path)) if has_tok
               else load_model(model, task.num_labels, 0, task.kind)[1])
        return net, tok
    raise CheckpointError(f"{path} holds neither a saved delta ({CONFIG_FILE}) nor a model (config.json).")


def _saved(path: str, task_spec: str | None, model: str | None):
    """(root, task, model name, train_result info) of a directory written by `train`."""
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"{root} does not exist.")
    info = read_result(root)
    task_spec = task_spec or info.get("task_spec") or info.get("task")
    if not task_spec:
        raise CheckpointError(f"{root} has no {RESULT_FILE}: pass --task.")
    return root, parse_task(task_spec), model or _model_arg(info.get("model")), info


def eval_saved(path: str, task_spec: str | None = None, model: str | None = None, dev_size: int = 0,
               max_length: int | None = None, batch_size: int = 64, device: str = "auto",
               mixed_precision: str = "no", data_dir: str | None = None, max_new_tokens: int | None = None,
               num_beams: int | None = None, predictions: str | None = None) -> dict[str, Any]:
    """Score a saved delta or model on a task's dev split; returns {task, metric, metrics, n}.
    Generation tasks: dev loss / perplexity and generations scored against every reference
    (``predictions``: write them to this JSON-lines file)."""
    root, task, model, info = _saved(path, task_spec, model)
    if predictions and not task.generative:
        raise ConfigError(f"--predictions writes generations; {task.name} is a {task.kind} task, which "
                          f"generates nothing: drop the option.")
    budget = info.get("budget", {})
    net, tok = load_saved(root, model, task)
    length = max_length or budget.get("max_length", 128)
    length = min(length, max_positions(net) or length)
    dev = task.read("dev", data_dir)
    scorer = dev_scorer(task, dev, tok, dev_size, length, batch_size,
                        max_new_tokens or budget.get("max_new_tokens", 64), num_beams or budget.get("num_beams", 1))
    metrics = score_model(net, scorer, accelerator(device, mixed_precision))
    out = {"task": task.name, "metric": task.metric, "metrics": metrics, "n": len(scorer),
           "path": str(root), "model": model or info.get("model")}
    if task.generative:
        gdev = scorer.dev
        out["data"] = {k: v for k, v in gdev.notes.items() if v}
        if predictions:
            rows = [{"input": i, "output": o, "references": r}
                    for i, o, r in zip(gdev.inputs, scorer.outputs, gdev.references)]
            atomic_write(Path(predictions), "".join(json.dumps(r) + "\n" for r in rows).encode())
    return out


def generate_saved(path: str, prompts: list[str], model: str | None = None, max_new_tokens: int = 64,
                   num_beams: int = 1, raw: bool = False, task_spec: str | None = None,
                   device: str = "auto") -> list[str]:
    """Completions of a saved delta (or model) for `prompts`, rendered as in training: the task's
    template around each prompt (a user turn through the chat template for chat tasks), unless ``raw``."""
    from .gendata import render_prompt
    from .generation import generate_texts
    from .genscore import cut_at

    root, task, model, info = _saved(path, task_spec, model)
    if not task.generative:
        raise ConfigError(f"{root} was trained on {task.name}, a {task.kind} task: generate needs a model "
                          f"trained on a causal-LM or seq2seq task (deltatune eval scores classifiers).")
    net, tok = load_saved(root, model, task)
    net.to(accelerator(device).device)
    chat = bool(info.get("chat")) and not raw
    inputs = [[{"role": "user", "content": p}] if chat else (p if raw else render_prompt(task, p)) for p in prompts]
    if chat:
        inputs = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in inputs]
    texts = generate_texts(net, tok, inputs, max_new_tokens=max_new_tokens, num_beams=num_beams)
    return [cut_at(t, None if raw else task.stop) for t in texts]


def _model_arg(label: str | None) -> str | None:
    from ..models import DEFAULT_MODEL

    return None if label in (None, DEFAULT_MODEL) else label
