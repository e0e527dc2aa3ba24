"""The error catalogue (docs/errors.md): every entry raises its type with its message and fix.

Each case is (id, error type, a regex the message must match, a callable that raises it); the
docs page lists the same ids, and `test_every_case_is_documented` keeps the two in step."""
import json
import re
from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.errors import CheckpointError, ConfigError, DeltaNotFoundError, MergeError, TargetError
from deltatune.models import tiny_inputs, tiny_model

DOCS = Path(__file__).resolve().parents[2] / "docs" / "errors.md"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved LoRA delta on tiny BERT (bytes of its two files, to corrupt copies of)."""
    root = tmp_path_factory.mktemp("saved") / "d"
    dm = dt.wrap(tiny_model("bert"), dt.LoRAConfig(r=2))
    dm.save(root)
    meta = json.loads((root / "delta_config.json").read_text())
    return root, meta


def copy_of(saved, tmp_path, meta=None, weights=None, drop_checksum=False):
    root, orig = saved
    meta = meta if meta is not None else orig
    if drop_checksum:
        meta = dict(meta)
        meta.pop("meta_sha256")
    out = tmp_path / "copy"
    out.mkdir()
    (out / "delta_config.json").write_text(json.dumps(meta) if isinstance(meta, dict) else meta)
    blob = (root / orig["weights"]).read_bytes()
    (out / orig["weights"]).write_bytes(weights(blob) if weights else blob)
    return out


def load_into_bert(path):
    return lambda: dt.load(tiny_model("bert"), path)


def merge_adapter():
    dt.wrap(tiny_model("bert"), {"method": "adapter"}).merge()


def activate_missing():
    dt.wrap(tiny_model("bert"), dt.LoRAConfig(r=2)).activate("defualt")


def merge_tied():
    dt.wrap(tiny_model("gpt2"), dt.LoRAConfig(targets=["wte"])).merge()


def wrapped_twice():
    model = tiny_model("bert")
    dt.wrap(model, dt.LoRAConfig())
    dt.wrap(model, dt.LoRAConfig())


def per_example_short():
    model = tiny_model("bert")
    dt.wrap(model, dt.LoRAConfig())(**tiny_inputs(model, batch=2), deltas=["default"])


def save_without_delta():
    import tempfile

    dm = dt.wrap(tiny_model("bert"), dt.LoRAConfig())
    dm.remove("default")
    with tempfile.TemporaryDirectory() as d:
        dm.save(d)


def base_cast_in_part():
    dm = dt.wrap(tiny_model("bert"), {"method": "bitfit"})
    dm.model.bert.encoder.layer[1].half()
    dm(**tiny_inputs(dm.model))


def unstepped_schedule():
    model = tiny_model("bert")
    dm = dt.wrap(model, {"method": "adalora", "total_step": 100})
    x = tiny_inputs(model)
    for _ in range(64):  # a loop that never calls dm.step()
        dm(**x)


def foreign_model_file():
    import tempfile

    model = tiny_model("bert")
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        dt.wrap(model, dt.LoRAConfig()).save_pretrained(d)


def prefix_on_packed_rows():
    model = tiny_model("llama", task="lm")
    ids = torch.randint(3, 128, (1, 6))
    dt.wrap(model, {"method": "prefix"})(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]))


def regularization_outside_the_loss():
    from types import MethodType

    from deltatune.callback import DeltaCallback

    dm = dt.wrap(tiny_model("llama", task="lm"), {"method": "adamix"})
    dm.forward = MethodType(lambda self, **kw: None, dm)  # as TRL's fused LM head replaces it
    DeltaCallback().on_train_begin(None, None, None, model=dm)


def ranks_not_followed():
    model = tiny_model("bert")
    dm = dt.wrap(model, {"method": "increlora", "init_r": 1, "target_r": 3, "rank_step": 1, "top_h": 2, "tinit": 1,
                         "deltaT": 2, "total_step": 12})
    x = tiny_inputs(model, batch=4, seed=3)
    opt = torch.optim.AdamW(dm.trainable_parameters(), lr=1e-2)  # never given the new ranks
    dm.train()
    for i in range(6):
        dm(**x, labels=torch.arange(4) % 2).loss.backward()
        opt.step()
        opt.zero_grad()
        dm.step(i)


def read_data_file(blob: bytes, suffix: str = ".csv"):
    """parse_task + read of a train/dev file holding `blob` (in a temporary directory)."""
    import tempfile

    from deltatune.bench.tasks import parse_task

    def call():
        with tempfile.TemporaryDirectory() as d:
            path = f"{d}/data{suffix}"
            with open(path, "wb") as f:
                f.write(blob)
            parse_task(f"mine:train={path},dev={path},text=text,label=label").read("dev")
    return call


CONFIG_CASES = [
    ("unknown-method", ConfigError, r"unknown method 'lorra'\. Did you mean: lora.*Registered methods: ",
     lambda: dt.config_from_dict({"method": "lorra"})),
    ("no-method-key", ConfigError, r"no 'method' key; add one",
     lambda: dt.config_from_dict({"r": 8})),
    ("rank-not-positive", ConfigError, r"LoRAConfig\.r=0 is invalid: expected an integer >= 1\.",
     lambda: dt.LoRAConfig(r=0)),
    ("rank-not-integer", ConfigError, r"LoRAConfig\.r=2\.5 is invalid: expected an integer",
     lambda: dt.LoRAConfig(r=2.5)),
    ("dropout-out-of-range", ConfigError, r"LoRAConfig\.dropout=1\.0 is invalid: expected a number in \[0\.0, 1\.0\)",
     lambda: dt.LoRAConfig(dropout=1.0)),
    ("reduction-factor-not-positive", ConfigError, r"AdapterConfig\.reduction_factor=0 is invalid: expected a number > 0",
     lambda: dt.config_from_dict({"method": "adapter", "reduction_factor": 0})),
    ("reduction-factor-too-large", ConfigError,
     r"reduction_factor=64 leaves no bottleneck for hidden size 32.*use reduction_factor <= 32, or set bottleneck",
     lambda: dt.wrap(tiny_model("bert"), {"method": "adapter", "reduction_factor": 64})),
    ("compacter-not-dividing", ConfigError, r"hidden size at .* is 32, not divisible by n=3; pick n dividing it",
     lambda: dt.wrap(tiny_model("bert"), {"method": "compacter", "n": 3})),
    ("unknown-config-key", ConfigError, r"unknown key 'rank' for method 'lora'\. Did you mean: r\?.*Valid keys: ",
     lambda: dt.config_from_dict({"method": "lora", "rank": 8})),
    ("misspelled-config-key", ConfigError, r"unknown key 'alpah'.*Did you mean: alpha",
     lambda: dt.config_from_dict({"method": "lora", "alpah": 8})),
    ("targets-match-nothing", TargetError,
     r"targets \['qeury'\] match no module of the model \(method 'lora'\)\. Closest module names: 'query' "
     r"\(e\.g\. bert\.encoder\.layer\.0\.attention\.self\.query\)",
     lambda: dt.wrap(tiny_model("bert"), dt.LoRAConfig(targets=["qeury"]))),
    ("unsupported-module-type", TargetError,
     r"method 'lora' supports Linear, Conv1D, Embedding modules, but targets match bert\.embeddings\.LayerNorm "
     r"\(LayerNorm\).*Narrow `targets`",
     lambda: dt.wrap(tiny_model("bert"), dt.LoRAConfig(targets=["LayerNorm"]))),
    ("merge-not-mergeable", MergeError,
     r"delta 'default' \(adapter\) cannot be merged: SerialAdapter at .* has no weight to fold into\. Keep it "
     r"unmerged", merge_adapter),
    ("merge-tied-weight", MergeError, r"transformer\.wte\.weight is tied to lm_head\.weight.*Keep it unmerged",
     merge_tied),
    ("activate-missing-name", DeltaNotFoundError, r"no delta named 'defualt'\. Did you mean: default\? "
     r"This model holds: default\.", activate_missing),
    ("save-without-delta", ConfigError, r"this model holds no delta, so there is nothing to save",
     save_without_delta),
    ("invalid-target-regex", ConfigError, r"LoRAConfig\.targets='\(query' is invalid: expected a valid regular "
     r"expression .*pass a list, e\.g\. \['\(query'\]", lambda: dt.LoRAConfig(targets="(query")),
    ("target-and-saved", TargetError, r"classifier is both a target of 'lora' and inside modules_to_save entry "
     r"'classifier' \(trained whole\): name it in only one of the two",
     lambda: dt.wrap(tiny_model("bert"), dt.LoRAConfig(targets=["classifier"], modules_to_save=["classifier"]))),
    ("non-finite-value", ConfigError, r"LoRAConfig\.alpha=inf is invalid: expected finite numbers",
     lambda: dt.LoRAConfig(alpha=float("inf"))),
    ("layers-beyond-model", TargetError, r"layers \[5\] are beyond the model's 2 blocks: use indices in 0\.\.1",
     lambda: dt.wrap(tiny_model("bert"), dt.LoRAConfig(layers=[5]))),
    ("wrapped-twice", ConfigError, r"already runs the deltas of another DeltaModel, active or disabled .* keep using the first "
     r"wrapper", wrapped_twice),
    ("per-example-names-mismatch", ConfigError, r"deltas= gives 1 names for a batch of 2 rows: give one delta "
     r"name \(or None for the base\) per example", per_example_short),
    ("base-cast-in-part", ConfigError, r"part of the base model was cast from torch\.float32 to torch\.float16 "
     r"after wrapping, but .* is torch\.float32: cast the whole model \(dm\.to\(torch\.float16\)\)",
     base_cast_in_part),
    ("unstepped-schedule", ConfigError, r"64 training calls ran and dm\.step\(\) was never called, so the "
     r"schedule of \['default'\] \(adalora\) never ran: .* callbacks=\[deltatune\.DeltaCallback\(\)\]",
     unstepped_schedule),
    ("foreign-model-file", ConfigError, r"model\.safetensors exists and was not written by deltatune \(a full "
     r"model\?\): save the deltas into another directory", foreign_model_file),
    ("prefix-on-packed-rows", ConfigError, r"prefix tuning on packed rows .* set packing=False, or use 'prompt'",
     prefix_on_packed_rows),
    ("regularization-outside-the-loss", ConfigError, r"replaced the model's forward .* the regularization of "
     r"\['default'\] cannot join the loss", regularization_outside_the_loss),
    ("empty-data-file", ConfigError, r"data\.csv is empty: it needs a header row and at least one example row",
     read_data_file(b"\n")),
    ("header-only-data-file", ConfigError, r"data\.csv holds only its header row \('text,label'\), no example: "
     r"add example rows below it", read_data_file(b"text,label\n")),
    ("data-file-not-utf8", ConfigError, r"data\.csv is not valid UTF-8 text \(line 2, byte 14: invalid "
     r"continuation byte\): save it as UTF-8", read_data_file(b"text,label\ncaf\xe9 ok,pos\n")),
    ("unreadable-data-file", ConfigError, r"data\.jsonl cannot be read as JSONL \(.*\): fix the file, or convert",
     read_data_file(b'{"text": "a", "label": "x"}\n{oops\n', ".jsonl")),
    ("dylora-dora", ConfigError, r"DyLoRAConfig\.dora=True is invalid: .* every truncation of it; use method='lora' "
     r"with dora=True", lambda: dt.DyLoRAConfig(r=4, dora=True)),
    ("delta-lora-dropout", ConfigError, r"DeltaLoRAConfig\.dropout=0\.1 is invalid: expected 0: Delta-LoRA removes",
     lambda: dt.DeltaLoRAConfig(dropout=0.1)),
    ("qalora-group-not-dividing", ConfigError, r"QALoRAConfig\.group_size=5 does not divide the 32 input features of "
     r"bert\.encoder\.layer\.0\.attention\.self\.query: choose a group_size",
     lambda: dt.wrap(tiny_model("bert"), {"method": "qalora", "r": 2, "group_size": 5})),
    ("loraprune-group-not-targeted", ConfigError, r"LoRAPrune estimates the importance of the channels of "
     r"bert\.encoder\.layer\.0 .* add them to targets, or set channels=False",
     lambda: dt.wrap(tiny_model("bert"), {"method": "loraprune", "r": 2, "targets": ["query", "value"],
                                          "total_step": 10})),
    ("optimizer-missed-new-ranks", dt.DeltaError, r"added ranks at step 2, but the optimizer does not train them",
     ranks_not_followed),
]


@pytest.mark.parametrize("case, kind, message, call", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_and_model_errors(case, kind, message, call):
    with pytest.raises(kind, match=message):
        call()


def _flip(blob: bytes) -> bytes:
    mid = len(blob) // 2
    return blob[:mid] + bytes([blob[mid] ^ 0xFF]) + blob[mid + 1:]


CHECKPOINT_CASES = [
    # id, regex, how to make the broken copy (saved, tmp_path) -> path, model arch/overrides
    ("architecture-mismatch", r"trained on a 'bert' model \(BertForSequenceClassification\), but this model is "
     r"'gpt2'.*load it into the base it was trained on", lambda s, t: s[0], ("gpt2", {})),
    ("shape-mismatch", r"query\.bias has shape \[32\] in the base it was trained on but \[48\] here: the base model "
     r"differs", lambda s, t: s[0], ("bert", {"hidden_size": 48})),
    ("newer-version", r"saved by deltatune .* \(format 99\); this is deltatune .* upgrade deltatune to load it",
     lambda s, t: copy_of(s, t, {**s[1], "format_version": 99}, drop_checksum=True), None),
    ("truncated-safetensors", r"does not match the sha256 in delta_config\.json: it is truncated or corrupt",
     lambda s, t: copy_of(s, t, weights=lambda b: b[: len(b) // 2]), None),
    ("corrupted-safetensors", r"does not match the sha256 in delta_config\.json: it is truncated or corrupt",
     lambda s, t: copy_of(s, t, weights=_flip), None),
    ("invalid-safetensors", r"is not a valid safetensors file",
     lambda s, t: copy_of(s, t, {**s[1], "sha256": __import__("hashlib").sha256(b"junk").hexdigest()},
                          weights=lambda b: b"junk", drop_checksum=True), None),
    ("missing-weights", r"cannot read .*delta-.*safetensors .*the checkpoint is incomplete",
     lambda s, t: _without_weights(copy_of(s, t), s[1]), None),
    ("malformed-json", r"delta_config\.json is not a readable JSON file .*the checkpoint is corrupt",
     lambda s, t: copy_of(s, t, '{"format": "deltatune", '), None),
    ("edited-json", r"does not match its checksum \(meta_sha256\): the file is corrupt or was edited.*delete the "
     r"'meta_sha256' entry", lambda s, t: copy_of(s, t, {**s[1], "name": "other"}), None),
    ("unknown-json-entry", r"has unknown entries \['extra'\]: the file is corrupt, or was written by a newer",
     lambda s, t: copy_of(s, t, {**s[1], "extra": 1}, drop_checksum=True), None),
    ("unknown-saved-config-key", r"delta_config\.json: its method config is invalid: unknown key 'rank' for "
     r"method 'lora'", lambda s, t: copy_of(s, t, {**s[1], "config": {**s[1]["config"], "rank": 4}},
                                            drop_checksum=True), None),
    ("malformed-fingerprint", r"delta_config\.json: its 'base' entry \(the fingerprint of the model it was "
     r"trained on\) is malformed: 'modules' is a list, not an object of module paths\. The file is corrupt or "
     r"was edited: restore it from a copy",
     lambda s, t: copy_of(s, t, {**s[1], "base": {**s[1]["base"], "modules": []}}, drop_checksum=True), None),
    ("not-a-delta", r"holds no delta_config\.json or deltas\.json: not a saved delta",
     lambda s, t: t, None),
    ("missing-path", r"does not exist", lambda s, t: t / "nowhere", None),
]


def _without_weights(path, meta):
    (path / meta["weights"]).unlink()
    return path


@pytest.mark.parametrize("case, message, make, model", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_checkpoint_errors(case, message, make, model, saved, tmp_path):
    path = make(saved, tmp_path)
    arch, overrides = model or ("bert", {})
    if "hidden_size" in overrides:
        overrides = {**overrides, "num_attention_heads": 4}
    with pytest.raises(CheckpointError, match=message):
        dt.load(tiny_model(arch, **overrides), path)


def test_a_deliberate_edit_loads_once_the_checksum_is_dropped(saved, tmp_path):
    meta = {**saved[1], "config": {**saved[1]["config"], "dropout": 0.25}}
    dm = dt.load(tiny_model("bert"), copy_of(saved, tmp_path, meta, drop_checksum=True))
    assert dm.get_delta("default").config.dropout == 0.25


def test_every_case_is_documented():
    text = DOCS.read_text(encoding="utf-8")
    documented = set(re.findall(r"^### `([a-z0-9-]+)`", text, flags=re.M))
    ids = {c[0] for c in CONFIG_CASES} | {c[0] for c in CHECKPOINT_CASES} | {"non-finite-loss", "foreign-checkpoint"}
    assert ids == documented, (ids - documented, documented - ids)
