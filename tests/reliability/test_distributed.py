"""Two CPU processes (torchrun, gloo) train the same delta as one process with the same global
batch, and all-reduce only the trainable tensors' gradients."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltatune.bench import Budget, SuiteConfig
from deltatune.bench.single import train_one
from deltatune.core import state

HERE = Path(__file__).resolve().parent
SRC = str(HERE.parents[1] / "src")


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", str(HERE / "ddp_worker.py"), str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def record(path):
    return json.loads((path / "train_result.json").read_text())


def test_two_processes_equal_one_with_the_global_batch(two_procs, tmp_path):
    cfg = SuiteConfig(model="tiny-llama", budget=Budget(steps=4, batch_size=8, eval_every=4, dev_size=32),
                      quiet=True, threads=1)
    one = train_one(cfg, "SST-2", "lora:r=4", 0, str(tmp_path / "one"))
    two = record(two_procs / "lora")
    assert two["environment"]["num_processes"] == 2 and one["environment"]["num_processes"] == 1
    a = state.read_tensors(tmp_path / "one", state.read_meta(tmp_path / "one"))
    b = state.read_tensors(two_procs / "lora", state.read_meta(two_procs / "lora"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert any(v.abs().max() > 1e-3 for v in a.values())  # it trained: not two zero deltas
    assert two["metrics"] == one["metrics"]


def test_only_trainable_gradients_are_all_reduced(two_procs):
    lora, full = record(two_procs / "lora"), record(two_procs / "full")
    # float32 gradients, one all-reduce per step: 4 bytes per trainable parameter, no more
    assert lora["efficiency"]["comm_bytes_per_step"] == 4 * lora["efficiency"]["trainable"]
    assert full["efficiency"]["comm_bytes_per_step"] == 4 * full["efficiency"]["trainable"]
    assert full["efficiency"]["trainable"] == full["efficiency"]["base_params"]
    assert lora["efficiency"]["comm_bytes_per_step"] < full["efficiency"]["comm_bytes_per_step"] / 20


def test_fsdp2_trains_a_delta_like_one_process(two_procs):
    """fully_shard around a DeltaModel (CPU, gloo): the same delta as plain training."""
    import deltatune as dt
    from deltatune.models import tiny_inputs, tiny_model
    from safetensors.torch import load_file

    model = tiny_model("bert", task="cls")
    torch.manual_seed(0)
    dm = dt.wrap(model, dt.LoRAConfig(r=4))
    opt = torch.optim.SGD([p for p in dm.parameters() if p.requires_grad], lr=0.5)
    dm.eval()  # as in the worker: no dropout
    x = tiny_inputs(model, batch=4)
    for _ in range(3):
        dm(**x, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        opt.step()
        opt.zero_grad()
    want = {n: p.detach() for n, p in dm.named_parameters() if p.requires_grad}
    got = load_file(two_procs / "fsdp.safetensors")
    assert got.keys() == want.keys() and len(got) == 10
    assert max(want[n].abs().max() for n in want if "lora_B" in n) > 1e-4  # it trained (B starts at 0)
    assert max((got[n] - want[n]).abs().max().item() for n in got) < 1e-5
