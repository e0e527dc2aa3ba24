"""`deltatune convert SRC DST --to peft|deltatune` on the command line (a subprocess)."""
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import BertForSequenceClassification

import deltatune as dt
from deltatune.cli import main
from deltatune.models import logits_of, tiny_inputs, tiny_model
from peft_helpers import train

SRC = str(Path(__file__).resolve().parents[2] / "src")


def cli(*args):
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "deltatune.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_convert_both_ways(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base_dir = tmp_path / "base"
    tiny_model("bert", "cls").save_pretrained(base_dir)
    pm = get_peft_model(BertForSequenceClassification.from_pretrained(base_dir),
                        LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    inputs = tiny_inputs(pm.base_model.model)
    train(pm, inputs)
    want = logits_of(pm, inputs)
    pm.save_pretrained(tmp_path / "peft")

    # the base model is found through the peft config's base_model_name_or_path
    done = cli("convert", tmp_path / "peft", tmp_path / "ours", "--to", "deltatune")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ours" / "delta_config.json").exists()
    dm = dt.load(BertForSequenceClassification.from_pretrained(base_dir), tmp_path / "ours")
    torch.testing.assert_close(logits_of(dm, inputs), want, atol=1e-5, rtol=0)

    # a deltatune checkpoint names no model directory: --model gives it (in-process: faster)
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "p2"), "--to", "peft"]) == 1
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "p2"), "--to", "peft",
                 "--model", str(base_dir)]) == 0
    back = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(base_dir), tmp_path / "p2")
    back.eval()
    torch.testing.assert_close(logits_of(back, inputs), want, atol=1e-5, rtol=0)


def test_convert_errors_are_clear(tmp_path, capsys):
    assert main(["convert", str(tmp_path), str(tmp_path), "--to", "peft"]) == 1
    assert "same directory" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "out"), "--to", "peft"]) == 1
    assert "--model DIR" in capsys.readouterr().err
