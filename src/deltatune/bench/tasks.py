"""The task registry: the six GLUE tasks shipped as package data, plus user datasets.

A task turns a split ("train", "dev") into `Examples`: text tuples (one or two texts) and labels
(class ids, or floats for regression); a generation task (kind ``causal_lm`` or ``seq2seq``)
into `GenExamples`: prompt -> completion pairs, grouped by input for multi-reference scoring.
The kind comes from the column mapping (``label=`` / ``prompt=,completion=`` / ``messages=`` /
``source=,target=``), never from guessing. GLUE files are read as the GLUE benchmark distributes them
(tab-separated, no quoting: quote characters are text); ``data_dir`` points at another copy with
the same layout (``<data_dir>/<task>/<split>.tsv``). User datasets come from local CSV / JSON /
Parquet files through the `datasets` library, with a column mapping. Nothing is downloaded.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError, did_you_mean

SPLITS = ("train", "dev")
METRIC_RANGES = {"accuracy": (0.0, 1.0), "f1": (0.0, 1.0), "mcc": (-1.0, 1.0),
                 "pearson": (-1.0, 1.0), "spearman": (-1.0, 1.0),
                 "bleu": (0.0, 1.0), "rougeL": (0.0, 1.0), "exact_match": (0.0, 1.0),
                 "loss": (0.0, math.inf), "perplexity": (1.0, math.inf)}
KINDS = ("classification", "regression", "causal_lm", "seq2seq")
GENERATIVE = ("causal_lm", "seq2seq")
GEN_METRICS = ("bleu", "rougeL", "exact_match", "loss", "perplexity")


@dataclass
class Examples:
    texts: list[tuple[str, ...]]
    labels: list[Any]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: list[int]) -> Examples:
        return Examples([self.texts[i] for i in idx], [self.labels[i] for i in idx])


@dataclass
class GenExamples:
    """Prompt -> completion pairs. A prompt is a text, or chat turns (a list of {role, content}
    dicts, the completion being the last assistant turn's content). ``groups[i]`` names the
    input of pair i: pairs of one group are references of one input (E2E has several)."""

    prompts: list[Any]
    completions: list[str]
    groups: list[int] = field(default_factory=list)
    notes: dict[str, int] = field(default_factory=dict)  # counted actions on the way (rows skipped)

    def __post_init__(self) -> None:
        if not self.groups:
            self.groups = list(range(len(self.prompts)))

    def __len__(self) -> int:
        return len(self.completions)

    def subset(self, idx: list[int]) -> GenExamples:
        return GenExamples([self.prompts[i] for i in idx], [self.completions[i] for i in idx],
                           [self.groups[i] for i in idx], dict(self.notes))

    def inputs(self) -> list[int]:
        """Index of each group's first pair, in order of first appearance."""
        first: dict[int, int] = {}
        for i, g in enumerate(self.groups):
            first.setdefault(g, i)
        return list(first.values())

    def references(self) -> list[list[str]]:
        """Every completion of each group, in the order of ``inputs()``."""
        refs: dict[int, list[str]] = {}
        for g, c in zip(self.groups, self.completions):
            refs.setdefault(g, []).append(c)
        return list(refs.values())


@dataclass
class Task:
    """One task. ``reader(split, data_dir) -> Examples``; ``metric`` is the headline metric, one of
    ``metrics`` (names in `METRIC_RANGES`). Regression tasks have ``num_labels == 1``.
    ``kind``: one of `KINDS` (default: classification, or regression when ``num_labels == 1``).
    ``template``: how a generation task turns a raw input into the model's prompt (``{}``: the input);
    chat prompts go through the tokenizer's chat template instead."""

    name: str
    reader: Callable[[str, str | None], Examples]
    num_labels: int
    metric: str
    metrics: tuple[str, ...]
    labels: tuple[str, ...] = ()
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    kind: str = ""
    template: str = "{}"
    stop: str | None = None  # generations are cut at the first occurrence (E2E: one line each)

    def __post_init__(self) -> None:
        self.kind = self.kind or ("regression" if self.num_labels == 1 else "classification")
        if self.kind not in KINDS:
            raise ConfigError(f"task {self.name!r}: kind {self.kind!r} is unknown; use one of {KINDS}.")

    @property
    def regression(self) -> bool:
        return self.kind == "regression"

    @property
    def generative(self) -> bool:
        return self.kind in GENERATIVE

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


def read_tsv(path, header: bool = True) -> list[list[str]]:
    """Rows of a GLUE TSV file; utf-8-sig drops MRPC's byte-order mark."""
    try:
        check_text_file(path, header)
        with path.open(encoding="utf-8-sig", newline="") as f:
            return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist: the GLUE directory needs <TASK>/<split>.tsv files.") from None


def check_text_file(path, header: bool) -> None:
    """A user's text data file must be UTF-8 and hold an example (after its header, if `header`):
    else `datasets` or the csv module fail with a traceback that names neither file nor fix."""
    blob = Path(path).read_bytes()
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as e:
        line = blob[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path} is not valid UTF-8 text (line {line}, byte {e.start}: {e.reason}): save it "
                          f"as UTF-8 (e.g. iconv -f latin1 -t utf-8 IN > OUT).") from None
    lines = [ln for ln in text.lstrip("\ufeff").splitlines() if ln.strip()]
    if not lines:
        raise ConfigError(f"{path} is empty: it needs {'a header row and ' if header else ''}at least one "
                          f"example row.")
    if header and len(lines) == 1:
        raise ConfigError(f"{path} holds only its header row ({lines[0][:80]!r}), no example: add example "
                          f"rows below it.")


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
        rows = read_tsv(path, layout.header)
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


def regression_label(value: Any, where: str) -> float:
    """A regression target as a finite float; a missing, non-numeric or non-finite one names its row."""
    try:
        out = float(value) if value is not None and not isinstance(value, bool) and str(value).strip() else None
    except (TypeError, ValueError):
        out = None
    if out is None or not math.isfinite(out):
        raise ConfigError(f"{where}: regression label {value!r} is not a finite number: fix or drop that row.")
    return out


def _glue_label(raw: str, layout: GlueLayout, path, i: int) -> Any:
    if layout.regression:
        return regression_label(raw, f"{path}, row {i + 1}")
    try:
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
    return verify_files(glue_root(data_dir), tasks)


# -- E2E NLG ---------------------------------------------------------------------------------------
E2E_FILES = {"train": "train.txt", "dev": "test.txt"}  # the challenge's dev split trains, its test split scores
E2E_TEMPLATE = "Describe the restaurant in one sentence.\n{}\nSentence:\n"


def e2e_root(data_dir: str | None = None):
    if data_dir is not None:
        root = Path(data_dir)
        if not (root / "train.txt").is_file():
            root = root / "e2e"
        return root
    return resources.files("deltatune") / "data" / "e2e"


@functools.lru_cache(maxsize=4)
def read_e2e(split: str, data_dir: str | None = None) -> GenExamples:
    """``MR||reference`` lines; lines with the same MR are references of one input."""
    path = e2e_root(data_dir) / E2E_FILES[split]
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: the E2E directory needs train.txt and test.txt.")
    prompts, refs, groups, ids = [], [], [], {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        mr, sep, ref = line.partition("||")
        if not sep or not mr.strip() or not ref.strip():
            raise ConfigError(f"{path}, line {n}: expected 'meaning representation||reference'.")
        prompts.append(mr.strip())
        refs.append(ref.strip())
        groups.append(ids.setdefault(mr.strip(), len(ids)))
    return GenExamples(prompts, refs, groups)


def verify_files(root, names: list[str] | None = None) -> dict[str, bool]:
    """Files of a data directory against its ``SHA256SUMS`` ({file: ok}); {} without one."""
    sums = root / "SHA256SUMS"
    if not sums.is_file():
        return {}
    out = {}
    for line in sums.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        digest, name = line.split(maxsplit=1)
        if names is None or name.split("/")[0] in names:
            f = root / name
            out[name] = f.is_file() and hashlib.sha256(f.read_bytes()).hexdigest() == digest
    return out


def _register_e2e() -> None:
    register_task(Task("e2e", read_e2e, 0, "bleu", GEN_METRICS, (), "Novikova et al. 2017 (E2E NLG)",
                       {"checksums": e2e_root}, kind="causal_lm", template=E2E_TEMPLATE, stop="\n"),
                  replace=True)


# -- user datasets --------------------------------------------------------------------------------
BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def file_task(name: str, train: str, dev: str, text: str, label: str, text_pair: str | None = None,
              metric: str | None = None, labels: list[str] | None = None, regression: bool = False) -> Task:
    """A task from local files read by `datasets` (CSV/TSV, JSON lines, Parquet).

    text / text_pair / label name the columns. Class labels may be ints or strings: strings are
    mapped to ids in the order of ``labels`` (default: sorted names seen in train). ``regression``
    makes a one-output task scored by Pearson/Spearman.
    """
    files = _check_files(name, {"train": train, "dev": dev})
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

    datasets.disable_progress_bars()
    suffix = Path(path).suffix.lower()
    kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
    if BUILDERS[suffix] != "parquet":
        check_text_file(path, header=BUILDERS[suffix] == "csv")
    try:
        ds = datasets.load_dataset(BUILDERS[suffix], data_files={"split": path}, split="split", **kwargs)
    except Exception as e:  # pyarrow / datasets parse errors: name the file, the format, the cause
        cause = e
        while (cause.__cause__ or cause.__context__) is not None:
            cause = cause.__cause__ or cause.__context__
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
        raise ConfigError(f"{path} cannot be read as {suffix[1:].upper()} ({first}): fix the file, or "
                          f"convert it to one of {sorted(BUILDERS)}.") from e
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
            labels.append(regression_label(v, f"task {name!r}: {path} row {i}"))
        elif str(v) in index:
            labels.append(index[str(v)])
        else:
            raise ConfigError(f"task {name!r}: {path} row {i}: label {v!r} is not one of {list(label_names)}.")
    return Examples(texts, labels)


def _looks_like_text(values: list[Any]) -> bool:
    """Free text, not class names: most values distinct, or several words each."""
    strings = [str(v) for v in values]
    if not strings:
        return False
    distinct = len(set(strings))
    words = sum(len(v.split()) for v in strings) / len(strings)
    return (distinct > 10 and distinct > 0.5 * len(strings)) or words >= 4


def _check_label_column(name: str, path: str, label: str) -> None:
    values = _load(path, [label])[label]
    if not all(isinstance(v, (int, float, bool)) for v in values) and _looks_like_text(values):
        raise ConfigError(
            f"task {name!r}: column {label!r} of {path} looks like free text ({len(set(map(str, values)))} "
            f"distinct values in {len(values)} rows), not class labels. For generation use "
            f"prompt=COLUMN,completion={label} (a causal LM), or source=COLUMN,target={label} (an "
            f"encoder-decoder); for classification with many classes pass labels=a|b|c explicitly.")


def gen_file_task(name: str, train: str, dev: str, kind: str, columns: tuple[str, ...],
                  template: str = "{}", stop: str | None = None) -> Task:
    """A generation task from local files: ``columns`` = (prompt, completion), (messages,) or
    (source, target). Pairs with the same prompt are references of one input. Rows with an empty
    completion are skipped and counted (``GenExamples.notes``)."""
    files = _check_files(name, {"train": train, "dev": dev})
    cache: dict[str, GenExamples] = {}

    def read(split: str, data_dir: str | None) -> GenExamples:
        if split not in cache:
            cache[split] = _read_gen(name, files[split], columns)
        return cache[split]

    if "{}" not in template:
        raise ConfigError(f"task {name!r}: template {template!r} must contain {{}} (where the input goes).")
    return Task(name, read, 0, "bleu", GEN_METRICS, (), f"files: {train}, {dev}", kind=kind,
                template=template, stop=stop)


def _read_gen(name: str, path: str, columns: tuple[str, ...]) -> GenExamples:
    ds = _load(path, list(columns))
    prompts, completions, skipped = [], [], 0
    rows = zip(*(ds[c] for c in columns))
    for i, row in enumerate(rows):
        prompt, completion = _chat_row(name, path, i, row[0]) if len(columns) == 1 else row
        if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
            raise ConfigError(f"task {name!r}: {path} row {i}: the {columns[0]!r} value is empty.")
        if completion is None or not str(completion).strip():
            skipped += 1
            continue
        prompts.append(prompt if isinstance(prompt, list) else str(prompt))
        completions.append(str(completion))
    if not prompts:
        raise ConfigError(f"task {name!r}: {path} has no row with a non-empty completion.")
    keys: dict[str, int] = {}
    groups = [keys.setdefault(json.dumps(p, sort_keys=True), len(keys)) for p in prompts]
    return GenExamples(prompts, completions, groups, {"empty_completions_skipped": skipped} if skipped else {})


def _chat_row(name: str, path: str, i: int, turns: Any) -> tuple[list[dict[str, str]], str]:
    """Chat turns ending with the assistant turn to predict: (turns, that turn's content)."""
    ok = isinstance(turns, list) and turns and all(
        isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str) for t in turns)
    if not ok:
        raise ConfigError(f"task {name!r}: {path} row {i}: messages must be a list of "
                          f"{{'role': ..., 'content': ...}} turns, got {str(turns)[:80]!r}.")
    if turns[-1]["role"] != "assistant":
        raise ConfigError(f"task {name!r}: {path} row {i}: the last turn is {turns[-1]['role']!r}; a chat "
                          f"example must end with the assistant turn the model learns to write.")
    return [{"role": t["role"], "content": t["content"]} for t in turns], turns[-1]["content"]


def _check_files(name: str, files: dict[str, str]) -> dict[str, str]:
    for split, f in files.items():
        if not Path(f).is_file():
            raise ConfigError(f"task {name!r}: {split} file {f!r} does not exist.")
        if Path(f).suffix.lower() not in BUILDERS:
            raise ConfigError(f"task {name!r}: {f!r} must end in one of {sorted(BUILDERS)}.")
    return files


# column mappings: which option names make which kind of task
MAPPINGS = {
    "classification": ("text", "label"),
    "causal_lm": ("prompt", "completion"),
    "chat": ("messages",),
    "seq2seq": ("source", "target"),
}
CLS_OPTIONS = ("text", "text_pair", "label", "metric", "labels", "regression")
GEN_OPTIONS = ("prompt", "completion", "messages", "source", "target", "template", "stop")
SPEC_HELP = ("NAME:train=FILE,dev=FILE, then text=COL,label=COL (classification), prompt=COL,completion=COL "
             "or messages=COL (causal LM), or source=COL,target=COL (seq2seq)")


def _mapping(name: str, opts: dict[str, Any]) -> str:
    """Which kind of task the column options describe; mixed or incomplete mappings are refused."""
    named = [k for k, cols in MAPPINGS.items() if any(c in opts for c in cols)]
    if len(named) != 1:
        what = "no column mapping" if not named else f"columns of several kinds ({', '.join(named)})"
        raise ConfigError(f"task {name!r} has {what}: use exactly one of {SPEC_HELP}.")
    kind = named[0]
    missing = [c for c in MAPPINGS[kind] if c not in opts]
    if missing:
        raise ConfigError(f"task {name!r} needs {missing[0]}=...: {SPEC_HELP}.")
    wrong = [k for k in opts if k not in ("train", "dev", *(CLS_OPTIONS if kind == "classification" else GEN_OPTIONS))]
    if wrong:
        raise ConfigError(f"task {name!r}: option {wrong[0]!r} does not apply to a {kind} task.")
    return kind


def parse_task(spec: str) -> Task:
    """A registered task name, or ``NAME:train=F,dev=F,<column mapping>[,...]``, registered on the
    way. Classification options: metric, labels=a|b|c, regression=true; generation options:
    template=... ({} = the input), stop=... (cut generations there)."""
    if ":" not in spec:
        return get_task(spec)
    name, _, rest = spec.partition(":")
    opts: dict[str, Any] = {}
    for part in filter(None, rest.split(",")):
        key, eq, value = part.partition("=")
        if not eq:
            raise ConfigError(f"task option {part!r} in {spec!r} must look like key=value.")
        opts[key.strip()] = value.strip()
    allowed = ("train", "dev", *CLS_OPTIONS, *GEN_OPTIONS)
    for k in opts:
        if k not in allowed:
            raise ConfigError(f"task option {k!r} is unknown.{did_you_mean(k, allowed)} Options: {allowed}.")
    for k in ("train", "dev"):
        if k not in opts:
            raise ConfigError(f"task {name!r} needs {k}=...: {SPEC_HELP}.")
    kind = _mapping(name, opts)
    if kind == "classification":
        task = _classification_task(name, opts)
    else:
        cols = tuple(opts[c] for c in MAPPINGS[kind])
        task = gen_file_task(name, opts["train"], opts["dev"], "causal_lm" if kind == "chat" else kind, cols,
                             opts.get("template", "{}").replace("\\n", "\n"),
                             opts.get("stop", "").replace("\\n", "\n") or None)
    task.extra["spec"] = spec
    return register_task(task, replace=True)


def _classification_task(name: str, opts: dict[str, Any]) -> Task:
    if "labels" in opts:
        opts["labels"] = opts["labels"].split("|")
    opts["regression"] = str(opts.get("regression", "false")).lower() in ("1", "true", "yes")
    if not opts["regression"] and "labels" not in opts:
        _check_files(name, {"train": opts["train"], "dev": opts["dev"]})
        _check_label_column(name, opts["train"], opts["label"])
    return file_task(name, **opts)


_register_glue()
_register_e2e()
