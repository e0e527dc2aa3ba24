import hashlib
import shutil
from importlib import resources

import pytest

from conftest import write_reviews
from deltatune.bench.tasks import available_tasks, get_task, parse_task, verify_glue
from deltatune.errors import ConfigError

ROWS = {"CoLA": (8551, 1043), "SST-2": (67349, 872), "MRPC": (3667, 408), "RTE": (2490, 277),
        "STS-B": (5749, 1500), "WNLI": (635, 71)}
GLUE = resources.files("deltatune") / "data" / "glue"


@pytest.mark.parametrize("name", list(ROWS))
def test_glue_tasks_read_every_row_with_valid_labels(name):
    task = get_task(name)
    for split, n in zip(("train", "dev"), ROWS[name]):
        ex = task.read(split)
        assert len(ex) == n == len(ex.texts)
        width = len(ex.texts[0])
        assert width in (1, 2) and all(len(t) == width for t in ex.texts)
        assert all(isinstance(s, str) for t in ex.texts for s in t)
        if task.regression:
            assert min(ex.labels) >= 0.0 and max(ex.labels) <= 5.0 and len(set(ex.labels)) > 10
        else:
            assert set(ex.labels) == set(range(task.num_labels))


def test_glue_rows_parse_as_written():
    """MRPC's byte-order mark and its quote characters, CoLA without a header, RTE's label names."""
    mrpc = get_task("MRPC").read("train")
    assert mrpc.texts[0][0].startswith('Amrozi accused his brother , whom he called " the witness "')
    assert mrpc.labels[0] == 1
    cola = get_task("CoLA").read("train")
    assert cola.texts[0] == ("Our friends won't buy this analysis, let alone the next one we propose.",)
    assert cola.labels[0] == 1
    rte = get_task("RTE").read("train")
    assert rte.texts[0] == ("No Weapons of Mass Destruction Found in Iraq Yet.",
                            "Weapons of Mass Destruction Found in Iraq.")
    assert rte.labels[0] == 1  # not_entailment
    assert get_task("STS-B").read("dev").labels[0] == 5.0
    assert get_task("sst-2").name == "SST-2"  # names are case-insensitive


def test_glue_checksums_match_sha256sums():
    lines = (GLUE / "SHA256SUMS").read_text(encoding="utf-8").split("\n")
    listed = dict(reversed(line.split()) for line in lines if line.strip())
    assert len(listed) == 12
    for name, digest in listed.items():
        assert hashlib.sha256((GLUE / name).read_bytes()).hexdigest() == digest, name
    assert verify_glue() == {name: True for name in listed}


def test_data_dir_points_elsewhere_and_checksums_catch_edits(tmp_path):
    root = tmp_path / "glue"
    (root / "SST-2").mkdir(parents=True)
    shutil.copy(GLUE / "SHA256SUMS", root / "SHA256SUMS")
    (root / "SST-2" / "train.tsv").write_text("sentence\tlabel\nfine film \t1\nbad \t0\n", encoding="utf-8")
    shutil.copy(GLUE / "SST-2" / "dev.tsv", root / "SST-2" / "dev.tsv")
    ex = get_task("SST-2").read("train", str(root))
    assert ex.texts == [("fine film ",), ("bad ",)] and ex.labels == [1, 0]
    ok = verify_glue(["SST-2"], str(root))
    assert ok == {"SST-2/train.tsv": False, "SST-2/dev.tsv": True}
    with pytest.raises(ConfigError, match="does not exist"):
        get_task("RTE").read("dev", str(root))
    with pytest.raises(ConfigError, match="not a directory"):
        get_task("RTE").read("dev", str(tmp_path / "nowhere"))


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_user_dataset_with_column_mapping(tmp_path, fmt):
    train = write_reviews(tmp_path / f"train.{fmt}", 30, 0, fmt)
    write_reviews(tmp_path / f"dev.{fmt}", 10, 1, fmt)
    task = parse_task(f"reviews_{fmt}:train={tmp_path}/train.{fmt},dev={tmp_path}/dev.{fmt},"
                      f"text=review,text_pair=title,label=verdict")
    assert task.name in available_tasks() and get_task(task.name) is task
    assert task.num_labels == 2 and task.labels == ("neg", "pos") and task.metric == "accuracy"
    ex = task.read("train")
    assert ex.texts == [(r["review"], r["title"]) for r in train]
    assert ex.labels == [int(r["verdict"] == "pos") for r in train]
    assert len(task.read("dev")) == 10


def test_user_regression_dataset_and_label_order(tmp_path):
    (tmp_path / "t.csv").write_text("a,b,score\nx y,x,0.5\nz,w,4.0\nq,q,2\n", encoding="utf-8")
    task = parse_task(f"sim:train={tmp_path}/t.csv,dev={tmp_path}/t.csv,text=a,text_pair=b,label=score,regression=true")
    assert task.regression and task.metric == "pearson" and task.metrics == ("pearson", "spearman")
    assert task.read("dev").labels == [0.5, 4.0, 2.0]
    task = parse_task(f"ord:train={tmp_path}/t.csv,dev={tmp_path}/t.csv,text=a,label=b,labels=z|x|w|q")
    assert task.labels == ("z", "x", "w", "q") and task.num_labels == 4
    assert task.read("train").labels == [1, 2, 3]
    assert "f1" not in task.metrics  # binary F1 only


def test_bad_task_specs_name_the_fix(tmp_path):
    write_reviews(tmp_path / "t.csv", 5, 0)
    with pytest.raises(ConfigError, match="Did you mean: SST-2"):
        get_task("SST2")
    with pytest.raises(ConfigError, match="needs label="):
        parse_task(f"x:train={tmp_path}/t.csv,dev={tmp_path}/t.csv,text=review")
    with pytest.raises(ConfigError, match="no column 'body'"):
        parse_task(f"x:train={tmp_path}/t.csv,dev={tmp_path}/t.csv,text=body,label=verdict").read("train")
    with pytest.raises(ConfigError, match="does not exist"):
        parse_task(f"x:train={tmp_path}/none.csv,dev={tmp_path}/t.csv,text=review,label=verdict")
    with pytest.raises(ConfigError, match="unknown"):
        parse_task(f"x:train={tmp_path}/t.csv,dev={tmp_path}/t.csv,text=review,label=verdict,colour=red")
    (tmp_path / "d.csv").write_text("review,title,verdict\nok,ok,meh\n", encoding="utf-8")
    task = parse_task(f"x:train={tmp_path}/t.csv,dev={tmp_path}/d.csv,text=review,label=verdict")
    with pytest.raises(ConfigError, match="label 'meh' is not one of"):
        task.read("dev")
