"""Saves leave the directory holding exactly what was saved, all-or-nothing under SIGKILL, and never
touch a file a deltatune save did not write (issue 18, "Saves and loads")."""
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.core import savedir
from deltatune.errors import ConfigError
from deltatune.models import logits_of, tiny_inputs, tiny_model

HERE = Path(__file__).parent


def lora_model(names=("default",), value=None, seed=0):
    dm = dt.wrap(tiny_model("bert"), dt.LoRAConfig(r=2, modules_to_save=[]), name=names[0])
    for n in names[1:]:
        dm.add(n, dt.LoRAConfig(r=2, modules_to_save=[]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dm.trainable_parameters():
            p.copy_(torch.full_like(p, value) if value is not None else torch.randn(p.shape, generator=g))
    return dm


def files(root):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file())


def test_one_then_several_then_one_loads_what_was_saved_last(tmp_path):
    root = tmp_path / "d"
    x = tiny_inputs(tiny_model("bert"))
    one, several = lora_model(seed=1), lora_model(("a", "b"), seed=2)
    (tmp_path / "d").mkdir()
    (root / "notes.txt").write_text("mine")
    for dm in (one, several, one, several, lora_model(seed=3)):
        dm.save(root)
        back = dt.load(tiny_model("bert"), root)
        assert back.deltas == dm.deltas
        for n in dm.deltas:
            back.activate(n)
            dm.activate(n)
            assert torch.equal(logits_of(back, x), logits_of(dm, x))
        want = {"notes.txt"} | {str(p.relative_to(root)) for p in savedir.owned(root)}
        assert set(files(root)) == want  # nothing stale: no old config, index or weights
    assert (root / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("how", ["remove", "unwrap"])
def test_saving_no_delta_is_refused_and_writes_nothing(tmp_path, how):
    dm = lora_model()
    dm.save(tmp_path / "d")
    before = {f: (tmp_path / "d" / f).read_bytes() for f in files(tmp_path / "d")}
    dm.remove("default") if how == "remove" else dm.unwrap()
    with pytest.raises(ConfigError, match="holds no delta"):
        dm.save(tmp_path / "d")
    assert {f: (tmp_path / "d" / f).read_bytes() for f in files(tmp_path / "d")} == before


def test_a_save_deletes_only_files_it_can_verify_as_its_own(tmp_path):
    root = tmp_path / "d"
    lora_model(seed=1).save(root)
    (root / "README.md").write_text("keep me")
    meta = json.loads((root / "delta_config.json").read_text())
    meta["weights"] = "README.md"  # an edited old config naming a foreign file as its weights
    (root / "delta_config.json").write_text(json.dumps(meta))
    (root / "delta-0123456789abcdef.safetensors").write_bytes(b"not ours: no manifest names it")
    lora_model(seed=2).save(root)
    assert (root / "README.md").read_text() == "keep me"
    assert (root / "delta-0123456789abcdef.safetensors").exists()
    index = {"format": "deltatune", "deltas": ["..", "x/../.."], "entries": {}}
    (root / "deltas.json").write_text(json.dumps(index))  # names that point outside
    (tmp_path / "delta_config.json").write_text('{"format": "deltatune"}')
    lora_model(("a", "b")).save(root)
    assert (tmp_path / "delta_config.json").exists() and (root / "README.md").exists()


def test_a_corrupt_old_config_does_not_block_the_save_and_temps_are_cleaned(tmp_path):
    root = tmp_path / "d"
    x = tiny_inputs(tiny_model("bert"))
    lora_model(seed=1).save(root)
    (root / "delta_config.json").write_bytes(b"\xff{ not json")
    (root / ".delta_config.json.abc123").write_bytes(b"left by a kill")
    (root / ".delta-0123456789abcdef.safetensors.xyz").write_bytes(b"left by a kill")
    dm = lora_model(seed=2)
    dm.save(root)
    assert torch.equal(logits_of(dt.load(tiny_model("bert"), root), x), logits_of(dm, x))
    assert not [f for f in files(root) if f.startswith(".")]


def test_the_later_manifest_wins_when_a_kill_left_both(tmp_path):
    root = tmp_path / "d"
    x = tiny_inputs(tiny_model("bert"))
    several = lora_model(("a", "b"), seed=2)
    several.save(root)
    index = (root / "deltas.json").read_bytes()
    one = lora_model(seed=1)
    one.save(root)  # removes the index after its commit; put it back as a kill would leave it
    (root / "deltas.json").write_bytes(index)
    assert torch.equal(logits_of(dt.load(tiny_model("bert"), root), x), logits_of(one, x))


@pytest.mark.parametrize("fmt", ["deltatune", "peft"])
def test_saves_killed_at_random_moments_load_as_one_whole_save(tmp_path, fmt):
    """SIGKILL a process that keeps saving generations 1, 2, 3, ... (1, 2 or 3 deltas, every tensor
    equal to the generation, the rank set by the count): what loads is always one generation,
    whole (peft: "default" in the root and each other adapter in its sub-directory), and the next
    save leaves no temporary file."""
    rng = random.Random(0 if fmt == "deltatune" else 1)
    trials = 6
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    seen = set()
    for t in range(trials):
        root = tmp_path / f"t{t}"
        proc = subprocess.Popen([sys.executable, str(HERE / "save_worker.py"), str(root), fmt],
                                stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline().strip() == b"ready"
        try:
            proc.wait(timeout=rng.uniform(0.05, 1.5))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        loaded = _load_generation(root, fmt)
        values = {float(v) for dm in loaded for n in dm.deltas for p in dm.get_delta(n).parameters()
                  for v in p.unique()}
        assert len(values) == 1, values  # every tensor of every delta from one generation
        g = int(values.pop())
        count = (2, 1, 3)[g % 3]
        assert sum(len(dm.deltas) for dm in loaded) == count
        assert {dm.get_delta(n).config.r for dm in loaded for n in dm.deltas} == {count + 1}
        seen.add(g)
        lora_model(seed=t).save(root, format=fmt)  # the next save cleans what the kill left
        assert not [f for f in files(root) if Path(f).name.startswith(".")], files(root)
    assert len(seen) > 1  # the kills fell at different moments


def _load_generation(root, fmt):
    """The deltas a directory holds, as loaded: one model (deltatune), or one per peft adapter of
    the generation found in the root (a sub-directory of an older, bigger generation is not it)."""
    first = dt.load(tiny_model("bert"), root)
    if fmt == "deltatune":
        return [first]
    g = int(next(first.get_delta("default").parameters()).flatten()[0])
    return [first] + [dt.load(tiny_model("bert"), root / f"d{i}") for i in range(1, (2, 1, 3)[g % 3])]


def test_a_peft_save_killed_after_its_commit_is_finished_by_the_next_reader(tmp_path):
    """The journal is the commit: with every new file staged and the journal in place but no rename
    done yet, dt.load gives the new save (and leaves the fixed names holding it, for peft too)."""
    from deltatune.interop import peft_files

    root = tmp_path / "d"
    x = tiny_inputs(tiny_model("bert"))
    old, new = lora_model(seed=1), lora_model(seed=2)
    old.save(root, format="peft")
    renames = []
    real_finish = peft_files.finish
    peft_files.finish = lambda where: renames.append(where)  # "killed" right after the commit
    try:
        new.save(root, format="peft")
    finally:
        peft_files.finish = real_finish
    assert (root / peft_files.JOURNAL).exists() and renames
    assert torch.equal(logits_of(dt.load(tiny_model("bert"), root), x), logits_of(new, x))
    assert not (root / peft_files.JOURNAL).exists()
    assert [f for f in files(root) if not f.startswith(".")] == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("journal", ['{"temps": ["../../etc/passwd"]}', '{"temps": ["x/.adapter_config.json.a/b"]}',
                                     "not json", '{"temps": "adapter_config.json"}', '[1, 2]'])
def test_a_journal_that_a_save_did_not_write_moves_nothing(tmp_path, journal):
    from deltatune.interop import peft_files

    root = tmp_path / "d"
    x = tiny_inputs(tiny_model("bert"))
    dm = lora_model(seed=1)
    dm.save(root, format="peft")
    (tmp_path / "passwd").write_text("mine")
    (root / peft_files.JOURNAL).write_text(journal)
    assert torch.equal(logits_of(dt.load(tiny_model("bert"), root), x), logits_of(dm, x))
    assert (tmp_path / "passwd").read_text() == "mine"


def test_peft_loads_every_adapter_of_a_journaled_save(tmp_path):
    """The fixed names peft needs hold the save once it finished: PeftModel.from_pretrained loads
    "default" from the root and another adapter from its sub-directory, saved over an older save."""
    from peft import PeftModel

    root = tmp_path / "d"
    x = tiny_inputs(tiny_model("bert"))
    lora_model(("default", "b"), seed=1).save(root, format="peft")
    dm = lora_model(("default", "b"), seed=2)
    dm.save(root, format="peft")
    for name, where in (("default", root), ("b", root / "b")):
        dm.activate(name)
        pm = PeftModel.from_pretrained(tiny_model("bert"), str(where))
        assert torch.allclose(logits_of(pm, x), logits_of(dm, x), atol=1e-6)
    assert not [f for f in files(root) if Path(f).name.startswith(".")]
