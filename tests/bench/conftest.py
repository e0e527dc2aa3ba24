import csv
import random

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and do not spin-wait on a shared CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_reviews(path, n, seed, fmt="csv"):
    """A learnable sentiment file: a verdict word among filler words, labels 'pos' / 'neg'."""
    rng = random.Random(seed)
    filler = "the a movie film story plot actor scene music long short old new".split()
    rows = []
    for _ in range(n):
        pos = rng.random() < 0.5
        words = rng.choices(filler, k=6) + [rng.choice(["great", "good", "lovely"] if pos else ["awful", "bad", "boring"])]
        rng.shuffle(words)
        rows.append({"review": " ".join(words), "title": rng.choice(filler), "verdict": "pos" if pos else "neg"})
    if fmt == "csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["review", "title", "verdict"])
            w.writeheader()
            w.writerows(rows)
    elif fmt == "jsonl":
        import json

        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        import pandas as pd

        pd.DataFrame(rows).to_parquet(path)
    return rows


@pytest.fixture
def reviews(tmp_path):
    """(train, dev) CSV paths of the learnable sentiment task."""
    write_reviews(tmp_path / "train.csv", 400, 0)
    write_reviews(tmp_path / "dev.csv", 64, 1)
    return tmp_path / "train.csv", tmp_path / "dev.csv"
