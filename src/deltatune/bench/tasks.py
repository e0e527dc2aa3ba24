"""The task registry: the six GLUE tasks shipped as package data, plus user datasets.

A task turns a split ("train", "dev") into `Examples`: text tuples (one or two texts) and labels
(class ids, or floats for regression). GLUE files are read as the GLUE benchmark distributes them
(tab-separated, no quoting: quote characters are text); ``data_dir`` points at another copy with
the same layout (``<data_dir>/<task>/<split>.tsv``). User datasets come from local CSV / JSON /
Parquet files through the `datasets` library, with a column mapping. Nothing is downloaded.
"""
from __future__ import annotations

import csv
import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError, did_you_mean

SPLITS = ("train", "dev")
METRIC_RANGES = {"accuracy": (0.0, 1.0), "f1": (0.0, 1.0), "mcc": (-1.0, 1.0),
                 "pearson": (-1.0, 1.0), "spearman": (-1.0, 1.0)}


@dataclass
class Examples:
    texts: list[tuple[str, ...]]
    labels: list[Any]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: list[int]) -> Examples:
        return Examples([self.texts[i] for i in idx], [self.labels[i] for i in idx])


@dataclass
class Task:
    """One task. ``reader(split, data_dir) -> Examples``; ``metric`` is the headline metric, one of
    ``metrics`` (names in `METRIC_RANGES`). Regression tasks have ``num_labels == 1``."""

    name: str
    reader: Callable[[str, str | None], Examples]
    num_labels: int
    metric: str
    metrics: tuple[str, ...]
    labels: tuple[str, ...] = ()
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def regression(self) -> bool:
        return self.num_labels == 1

    def read(self, split: str, data_dir: str | None = None) -> Examples:
        if split not in SPLITS:
            raise ConfigError(f"split {split!r} is unknown: use one of {SPLITS}.")
        return self.reader(split, data_dir)


_TASKS: dict[str, Task] = {}


def register_task(task: Task, replace: bool = False) -> Task:
    """Add a task (e.g. from ``file_task``) so that ``--task NAME`` and ``get_task`` find it."""
    if task.name in _TASKS and not replace:
        raise ConfigError(f"a task named {task.name!r} is registered already: pick another name.")
    for m in (task.metric, *task.metrics):
        if m not in METRIC_RANGES:
            raise ConfigError(f"task {task.name!r}: metric {m!r} is unknown; use one of {list(METRIC_RANGES)}.")
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    key = {n.lower(): n for n in _TASKS}.get(name.lower())
    if key is None:
        raise ConfigError(
            f"unknown task {name!r}.{did_you_mean(name, _TASKS)} Registered tasks: "
            f"{', '.join(_TASKS)}; a file dataset is NAME:train=FILE,dev=FILE,text=COLUMN,label=COLUMN."
        )
    return _TASKS[key]


def available_tasks() -> list[str]:
    return list(_TASKS)


# -- GLUE -------------------------------------------------------------------------------------------
def glue_root(data_dir: str | None = None):
    """The GLUE directory: ``data_dir`` if given, else the package data."""
    if data_dir is not None:
        root = Path(data_dir)
        if not root.is_dir():
            raise ConfigError(f"--data-dir {data_dir!r} is not a directory (expected <dir>/<TASK>/<split>.tsv).")
        return root
    return resources.files("deltatune") / "data" / "glue"


def read_tsv(path) -> list[list[str]]:
    """Rows of a GLUE TSV file; utf-8-sig drops MRPC's byte-order mark."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist: the GLUE directory needs <TASK>/<split>.tsv files.") from None


@dataclass(frozen=True)
class GlueLayout:
    """Where a GLUE file keeps its fields: column names (header files) or indices (CoLA)."""

    texts: tuple[str | int, ...]
    label: str | int
    header: bool = True
    label_map: dict[str, int] | None = None
    regression: bool = False


def _column(header: list[str] | None, key: str | int, path) -> int:
    if isinstance(key, int):
        return key
    if header is None or key not in header:
        raise ConfigError(f"{path}: no column {key!r} in header {header}.")
    return header.index(key)


def glue_reader(task: str, layout: GlueLayout) -> Callable[[str, str | None], Examples]:
    @functools.lru_cache(maxsize=4)
    def read(split: str, data_dir: str | None) -> Examples:  # callers copy (Examples.subset)
        path = glue_root(data_dir) / task / f"{split}.tsv"
        rows = read_tsv(path)
        header = rows.pop(0) if layout.header else None
        cols = [_column(header, t, path) for t in layout.texts]
        lab = _column(header, layout.label, path)
        texts, labels = [], []
        for i, row in enumerate(rows):
            if len(row) <= max(*cols, lab):
                raise ConfigError(f"{path}, row {i + 1 + layout.header}: {len(row)} fields, too few.")
            texts.append(tuple(row[c] for c in cols))
            labels.append(_glue_label(row[lab], layout, path, i))
        return Examples(texts, labels)

    return read


def _glue_label(raw: str, layout: GlueLayout, path, i: int) -> Any:
    try:
        if layout.regression:
            return float(raw)
        return layout.label_map[raw] if layout.label_map else int(raw)
    except (KeyError, ValueError):
        raise ConfigError(f"{path}, row {i + 1}: label {raw!r} is not valid for this task.") from None


GLUE = {
    # name: (layout, num_labels, headline metric, metrics, source)
    "CoLA": (GlueLayout((3,), 1, header=False), 2, "mcc", ("mcc", "accuracy"), "Warstadt et al. 2019"),
    "SST-2": (GlueLayout(("sentence",), "label"), 2, "accuracy", ("accuracy",), "Socher et al. 2013"),
    "MRPC": (GlueLayout(("#1 String", "#2 String"), "Quality"), 2, "f1", ("f1", "accuracy"),
             "Dolan & Brockett 2005"),
    "RTE": (GlueLayout(("sentence1", "sentence2"), "label",
                       label_map={"entailment": 0, "not_entailment": 1}), 2, "accuracy", ("accuracy",),
            "Dagan et al.; PASCAL RTE"),
    "STS-B": (GlueLayout(("sentence1", "sentence2"), "score", regression=True), 1, "pearson",
              ("pearson", "spearman"), "Cer et al. 2017"),
    "WNLI": (GlueLayout(("sentence1", "sentence2"), "label"), 2, "accuracy", ("accuracy",),
             "Levesque et al. 2011"),
}


def _register_glue() -> None:
    for name, (layout, n, metric, metrics, source) in GLUE.items():
        labels = tuple(layout.label_map) if layout.label_map else ()
        register_task(Task(name, glue_reader(name, layout), n, metric, metrics, labels, source,
                           {"glue": True}), replace=True)


def verify_glue(tasks: list[str] | None = None, data_dir: str | None = None) -> dict[str, bool]:
    """Check GLUE files against ``SHA256SUMS`` in the data directory ({file: ok}). Files of other
    tasks are skipped; a directory without SHA256SUMS gives {}."""
    root = glue_root(data_dir)
    sums = root / "SHA256SUMS"
    if not sums.is_file():
        return {}
    out = {}
    for line in sums.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        digest, name = line.split(maxsplit=1)
        if tasks is None or name.split("/")[0] in tasks:
            f = root / name
            out[name] = f.is_file() and hashlib.sha256(f.read_bytes()).hexdigest() == digest
    return out


# -- user datasets --------------------------------------------------------------------------------
BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def file_task(name: str, train: str, dev: str, text: str, label: str, text_pair: str | None = None,
              metric: str | None = None, labels: list[str] | None = None, regression: bool = False) -> Task:
    """A task from local files read by `datasets` (CSV/TSV, JSON lines, Parquet).

    text / text_pair / label name the columns. Class labels may be ints or strings: strings are
    mapped to ids in the order of ``labels`` (default: sorted names seen in train). ``regression``
    makes a one-output task scored by Pearson/Spearman.
    """
    files = {"train": train, "dev": dev}
    for split, f in files.items():
        if not Path(f).is_file():
            raise ConfigError(f"task {name!r}: {split} file {f!r} does not exist.")
        if Path(f).suffix.lower() not in BUILDERS:
            raise ConfigError(f"task {name!r}: {f!r} must end in one of {sorted(BUILDERS)}.")
    columns = (text,) if text_pair is None else (text, text_pair)
    label_names = tuple(labels or ())
    if not regression and not label_names:
        label_names = _infer_labels(files["train"], label)
    cache: dict[str, Examples] = {}

    def read(split: str, data_dir: str | None) -> Examples:
        if split not in cache:
            cache[split] = _read_file(name, files[split], columns, label, label_names, regression)
        return cache[split]

    n = 1 if regression else max(len(label_names), 2)
    metric = metric or ("pearson" if regression else "accuracy")
    metrics = ("pearson", "spearman") if regression else tuple(dict.fromkeys((metric, "accuracy", "f1")))
    if not regression and n > 2:
        metrics = tuple(m for m in metrics if m != "f1")  # binary F1 only
    return Task(name, read, n, metric, metrics, label_names, f"files: {train}, {dev}")


def _load(path: str, columns: list[str]):
    import datasets

    suffix = Path(path).suffix.lower()
    kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
    ds = datasets.load_dataset(BUILDERS[suffix], data_files={"split": path}, split="split", **kwargs)
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ConfigError(f"{path}: no column {missing[0]!r}; the file has {ds.column_names}.")
    return ds


def _infer_labels(path: str, label: str) -> tuple[str, ...]:
    values = _load(path, [label])[label]
    return tuple(str(v) for v in sorted(set(values), key=lambda v: (str(type(v)), v)))


def _read_file(name: str, path: str, columns: tuple[str, ...], label: str,
               label_names: tuple[str, ...], regression: bool) -> Examples:
    ds = _load(path, [*columns, label])
    index = {s: i for i, s in enumerate(label_names)}
    texts = list(zip(*(["" if v is None else str(v) for v in ds[c]] for c in columns)))
    labels = []
    for i, v in enumerate(ds[label]):
        if regression:
            labels.append(float(v))
        elif str(v) in index:
            labels.append(index[str(v)])
        else:
            raise ConfigError(f"task {name!r}: {path} row {i}: label {v!r} is not one of {list(label_names)}.")
    return Examples(texts, labels)


def parse_task(spec: str) -> Task:
    """A registered task name, or ``NAME:train=F,dev=F,text=COL[,text_pair=COL],label=COL[,...]``
    (options: metric, labels=a|b|c, regression=true), registered on the way."""
    if ":" not in spec:
        return get_task(spec)
    name, _, rest = spec.partition(":")
    opts: dict[str, Any] = {}
    for part in filter(None, rest.split(",")):
        key, eq, value = part.partition("=")
        if not eq:
            raise ConfigError(f"task option {part!r} in {spec!r} must look like key=value.")
        opts[key.strip()] = value.strip()
    allowed = ("train", "dev", "text", "text_pair", "label", "metric", "labels", "regression")
    for k in opts:
        if k not in allowed:
            raise ConfigError(f"task option {k!r} is unknown.{did_you_mean(k, allowed)} Options: {allowed}.")
    for k in ("train", "dev", "text", "label"):
        if k not in opts:
            raise ConfigError(f"task {name!r} needs {k}=...: NAME:train=FILE,dev=FILE,text=COLUMN,label=COLUMN.")
    if "labels" in opts:
        opts["labels"] = opts["labels"].split("|")
    opts["regression"] = str(opts.get("regression", "false")).lower() in ("1", "true", "yes")
    task = file_task(name, **opts)
    task.extra["spec"] = spec
    return register_task(task, replace=True)


_register_glue()
