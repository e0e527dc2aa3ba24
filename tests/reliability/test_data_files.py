"""A user's data files that cannot give examples (issue 18, "Clear errors instead of tracebacks"):
empty or header-only CSV / TSV / JSON lines files, and bytes that are not UTF-8, are refused with a
ConfigError naming the file (and the line) and the fix, before `datasets` or the csv module see
them; the CLI prints it as one `deltatune: error:` line. A malformed fingerprint in a saved config
is a CheckpointError, not an AttributeError."""
import json

import pytest

import deltatune as dt
from deltatune import cli
from deltatune.bench.tasks import get_task, parse_task
from deltatune.errors import CheckpointError, ConfigError
from deltatune.models import tiny_model

GOOD = {"csv": b"text,label\nfine day,pos\nbad day,neg\n", "tsv": b"text\tlabel\nfine day\tpos\nbad day\tneg\n",
        "jsonl": b'{"text": "fine day", "label": "pos"}\n{"text": "bad day", "label": "neg"}\n'}
EMPTY = {"nothing": b"", "blank-lines": b"\n\n  \n", "bom-only": b"\xef\xbb\xbf", "crlf-only": b"\r\n\r\n"}
HEADER_ONLY = {"header": "{h}\n", "header-no-newline": "{h}", "header-blank-lines": "{h}\n\n\n",
               "bom-header": "\ufeff{h}\r\n"}
HEADERS = {"csv": "text,label", "tsv": "text\tlabel"}
NOT_UTF8 = {  # (bytes, the line the message must name)
    "latin1": (b"text,label\ncaf\xe9 ok,pos\nbad day,neg\n", 2),
    "lone-continuation": (b"text,label\nfine,pos\nbad \x80 day,neg\n", 3),
    "truncated-at-end": (b"text,label\nfine,pos\nbad day \xe2\x82", 3),
    "utf16": ("text,label\nfine,pos\n".encode("utf-16"), 1),
    "cp1252-quotes": (b"text,label\n\x93quoted\x94,pos\nbad,neg\n", 2),
}


def spec(path, other=None):
    other = other or path
    return f"mine:train={path},dev={other},text=text,label=label"


def write(tmp_path, name, blob):
    path = tmp_path / name
    path.write_bytes(blob)
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
@pytest.mark.parametrize("case", list(EMPTY))
@pytest.mark.parametrize("split", ["train", "dev"])
def test_an_empty_file_is_refused_naming_it(tmp_path, fmt, case, split):
    bad = write(tmp_path, f"bad.{fmt}", EMPTY[case])
    good = write(tmp_path, f"good.{fmt}", GOOD[fmt])
    train, dev = (bad, good) if split == "train" else (good, bad)
    with pytest.raises(ConfigError, match=rf"{bad.name} is empty: it needs .*at least one example row"):
        parse_task(spec(train, dev)).read("dev")


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
@pytest.mark.parametrize("case", list(HEADER_ONLY))
def test_a_header_only_file_is_refused_naming_the_header(tmp_path, fmt, case):
    bad = write(tmp_path, f"bad.{fmt}", HEADER_ONLY[case].format(h=HEADERS[fmt]).encode())
    with pytest.raises(ConfigError, match=rf"{bad.name} holds only its header row \('text(,|\\t)label'\), no "
                                          rf"example: add example rows"):
        parse_task(spec(bad))


@pytest.mark.parametrize("case", list(NOT_UTF8))
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_bytes_that_are_not_utf8_name_the_line_and_the_fix(tmp_path, case, fmt):
    blob, line = NOT_UTF8[case]
    if fmt == "jsonl":  # the same bad bytes inside a JSON string
        blob = blob.replace(b"text,label\n", b"").replace(b",pos", b"").replace(b",neg", b"")
        blob = b"".join(b'{"text": "' + ln + b'", "label": "pos"}\n' for ln in blob.split(b"\n") if ln)
        line = None
    bad = write(tmp_path, f"bad.{fmt}", blob)
    where = rf"line {line}, " if line is not None else r"line \d+, "
    with pytest.raises(ConfigError, match=rf"{bad.name} is not valid UTF-8 text \({where}byte \d+: .*\): save it "
                                          rf"as UTF-8"):
        parse_task(spec(bad, write(tmp_path, f"good.{fmt}", GOOD[fmt]))).read("dev")


def test_valid_files_still_load_bom_and_crlf_included(tmp_path):
    for fmt, blob in GOOD.items():
        for variant in (blob, b"\xef\xbb\xbf" + blob.replace(b"\n", b"\r\n")) if fmt != "jsonl" else (blob,):
            path = write(tmp_path, f"ok.{fmt}", variant)
            ex = parse_task(spec(path)).read("dev")
            assert len(ex) == 2


def test_an_unparsable_file_is_one_error_naming_it(tmp_path):
    bad = write(tmp_path, "bad.jsonl", b'{"text": "a", "label": "pos"}\n{not json at all\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl cannot be read as JSONL \(.*\): fix the file"):
        parse_task(spec(bad))


@pytest.mark.parametrize("blob, message", [
    (b"", r"train\.tsv is empty"),
    (b"sentence\tlabel\n", r"train\.tsv holds only its header row"),
    (b"sentence\tlabel\nfine\t1\nd\xe9j\xe0\t0\n", r"train\.tsv is not valid UTF-8 text \(line 3, "),
])
def test_glue_files_in_a_data_dir_too(tmp_path, blob, message):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_bytes(blob)
    with pytest.raises(ConfigError, match=message):
        get_task("SST-2").read("train", str(tmp_path))


@pytest.mark.parametrize("blob, message", [
    (b"", "is empty"), (b"text,label\n", "holds only its header row"), (b"text,label\n\xff,1\n", "not valid UTF-8"),
])
def test_the_cli_prints_one_error_line(tmp_path, capsys, blob, message):
    bad = write(tmp_path, "bad.csv", blob)
    assert cli.main(["bench", "--list", "--tasks", spec(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deltatune: error: ") and message in err[0], err


# -- a malformed fingerprint in a saved config ------------------------------------------------------
FINGERPRINTS = {
    "a-string": "bert",
    "null": None,
    "a-list": [],
    "modules-a-list": {"model_type": "bert", "modules": []},
    "modules-a-string": {"model_type": "bert", "modules": "bert.encoder"},
    "module-maps-to-number": {"model_type": "bert", "modules": {"bert.pooler.dense": 5}},
    "shape-a-string": {"model_type": "bert", "modules": {"bert.pooler.dense": {"weight": "32x32"}}},
    "shape-of-strings": {"model_type": "bert", "modules": {"bert.pooler.dense": {"weight": ["32", "32"]}}},
    "shape-negative": {"model_type": "bert", "modules": {"bert.pooler.dense": {"weight": [-1, 32]}}},
    "shape-of-bools": {"model_type": "bert", "modules": {"bert.pooler.dense": {"weight": [True, 32]}}},
    "model-type-a-dict": {"model_type": {"x": 1}, "modules": {}},
}


@pytest.mark.parametrize("layout", ["one", "several"])
@pytest.mark.parametrize("case", list(FINGERPRINTS))
def test_a_malformed_fingerprint_is_a_checkpoint_error(tmp_path, case, layout):
    root = tmp_path / "d"
    dm = dt.wrap(tiny_model("bert"), dt.LoRAConfig(r=2))
    if layout == "several":
        dm.add("b", dt.LoRAConfig(r=2))
    dm.save(root)
    manifest = root / ("delta_config.json" if layout == "one" else "deltas.json")
    data = json.loads(manifest.read_text())
    meta = data if layout == "one" else data["entries"]["default"]
    meta["base"] = FINGERPRINTS[case]
    meta.pop("meta_sha256")  # a deliberate edit (the checksum would catch it first)
    manifest.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"its 'base' entry \(the fingerprint of the model it was trained "
                                              r"on\) is malformed: .*restore it from a copy"):
        dt.load(tiny_model("bert"), root)
