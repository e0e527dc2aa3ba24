"""Property-based tests (hypothesis) on tiny models: random valid configs of the methods that
promise identity at init give it and a bit-exact save/load round trip; random byte corruptions of
a saved delta never load silently and never execute code (nothing is unpickled)."""
import json
import pickle
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deltatune as dt
from deltatune.errors import DeltaError
from deltatune.models import logits_of, tiny_inputs, tiny_model

pos = st.floats(0.25, 32.0, allow_nan=False)
drop = st.sampled_from([0.0, 0.1, 0.5])
# The methods whose fresh delta is the identity, with their main numeric fields (tiny models:
# hidden size 32, so reduction factors and Compacter's n divide it).
STRATEGIES = {
    "lora": st.fixed_dictionaries({"r": st.integers(1, 8), "alpha": pos, "dropout": drop,
                                   "rslora": st.booleans(), "dora": st.booleans(),
                                   "init": st.sampled_from(["kaiming", "gaussian"])}),
    "dylora": st.integers(1, 6).flatmap(lambda r: st.fixed_dictionaries(
        {"r": st.just(r), "r_min": st.integers(1, r), "alpha": pos, "frozen": st.booleans()})),
    "lora_fa": st.fixed_dictionaries({"r": st.integers(1, 8), "alpha": pos, "dropout": drop}),
    "delta_lora": st.fixed_dictionaries({"r": st.integers(1, 8), "alpha": pos,
                                         "update_ratio": st.floats(0.0, 4.0), "start_step": st.integers(0, 5)}),
    "increlora": st.integers(1, 3).flatmap(lambda r: st.fixed_dictionaries(
        {"init_r": st.just(r), "target_r": st.integers(r + 1, 6), "alpha": pos, "total_step": st.just(20)})),
    "qalora": st.fixed_dictionaries({"r": st.integers(1, 8), "alpha": pos, "group_size": st.sampled_from([1, 2, 4, 8])}),
    "loraprune": st.fixed_dictionaries({"r": st.integers(1, 8), "alpha": pos, "sparsity": st.floats(0.1, 0.9),
                                        "total_step": st.just(50)}),
    "ia3": st.just({}),
    "vera": st.fixed_dictionaries({"r": st.integers(1, 32), "d_initial": st.floats(0.01, 1.0),
                                   "projection_prng_key": st.integers(0, 2**31), "dropout": drop}),
    "loha": st.fixed_dictionaries({"r": st.integers(1, 6), "alpha": pos}),
    "lokr": st.fixed_dictionaries({"r": st.integers(1, 4), "alpha": pos, "decompose_both": st.booleans()}),
    "adalora": st.integers(2, 6).flatmap(lambda r: st.fixed_dictionaries(
        {"init_r": st.just(r), "target_r": st.integers(1, r), "alpha": pos, "total_step": st.just(10)})),
    "bitfit": st.just({}),
    "layernorm": st.just({}),
    "partial": st.fixed_dictionaries({"last_k": st.integers(1, 2)}),
    "adapter": st.fixed_dictionaries({"reduction_factor": st.sampled_from([1, 2, 3, 5, 8, 16, 32]),
                                      "placement": st.sampled_from(["houlsby", "pfeiffer", "parallel"]),
                                      "activation": st.sampled_from(["relu", "gelu", "tanh"]),
                                      "layer_norm": st.booleans(), "dropout": drop}),
    "compacter": st.fixed_dictionaries({"n": st.sampled_from([2, 4]), "rank": st.integers(1, 2),
                                        "reduction_factor": st.sampled_from([2, 4, 8])}),
    "diff_pruning": st.fixed_dictionaries({"density": st.floats(0.01, 1.0)}),
    "lt_sft": st.fixed_dictionaries({"density": st.floats(0.01, 1.0)}),
}
METHODS = [m for m in STRATEGIES if m in dt.available_methods()]
configs = st.sampled_from(METHODS).flatmap(lambda m: STRATEGIES[m].map(lambda kw: {"method": m, **kw}))
FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def test_every_identity_method_is_sampled():
    assert {"lora", "ia3", "bitfit", "adapter"} <= set(METHODS)


@FAST
@given(config=configs, arch=st.sampled_from(["bert", "gpt2"]), seed=st.integers(0, 2**16))
def test_random_configs_identity_and_round_trip(tmp_path, config, arch, seed):
    model = tiny_model(arch, task="cls")
    x = tiny_inputs(model)
    base = logits_of(model, x)
    dm = dt.wrap(model, config)
    dm.eval()
    assert torch.allclose(logits_of(dm, x), base, atol=1e-6, rtol=0), config
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a trained-looking delta, so the round trip carries real numbers
        for p in dm.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    want = logits_of(dm, x)
    out = tmp_path / f"d{seed}"
    shutil.rmtree(out, ignore_errors=True)
    dm.save(out)
    loaded = dt.load(tiny_model(arch, task="cls"), out)
    loaded.eval()
    a, b = dm.get_delta("default").delta_state_dict(), loaded.get_delta("default").delta_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.get_delta("default").config == dm.get_delta("default").config
    assert torch.equal(logits_of(loaded, x), want)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz") / "d"
    dm = dt.wrap(tiny_model("bert"), dt.LoRAConfig(r=2, alpha=4.0, dropout=0.1, targets=["query", "value"]))
    with torch.no_grad():
        for p in dm.trainable_parameters():
            p.add_(0.01)
    dm.save(root)
    meta = json.loads((root / "delta_config.json").read_text())
    return root, meta, dm.get_delta("default").delta_state_dict()


@pytest.fixture
def no_unpickling(monkeypatch):
    """Anything that could run code from a file fails the test."""
    def forbidden(*a, **k):
        raise AssertionError("a saved delta was unpickled")

    for mod, name in ((pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(mod, name, forbidden)


# (where, new byte); bytes JSON is made of are favoured, so edits often keep the file parseable
byte = st.one_of(st.sampled_from(list(b'0123456789.-+eE"tfnaelrsu{}[],: ')), st.integers(0, 255))
edits = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), byte), min_size=1, max_size=4)


@FAST
@given(which=st.sampled_from(["json", "weights", "truncate"]), changes=edits)
def test_corrupted_delta_never_loads_silently(tmp_path, saved, no_unpickling, which, changes):
    root, meta, want = saved
    out = tmp_path / "c"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(root, out)
    target = out / ("delta_config.json" if which == "json" else meta["weights"])
    blob = bytearray(target.read_bytes())
    if which == "truncate":
        blob = blob[: int(changes[0][0] * len(blob))]
    else:
        for where, value in changes:
            blob[int(where * len(blob))] = value
    target.write_bytes(bytes(blob))
    try:
        dm = dt.load(tiny_model("bert"), out)
    except DeltaError:
        return  # refused, with one of the catalogued messages
    got = dm.get_delta(meta["name"])  # it loaded: then the corruption changed nothing that matters
    assert got.config.to_dict() == meta["config"]
    state = got.delta_state_dict()
    assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)


@FAST
@given(data=st.data())
def test_changed_numbers_in_the_config_are_refused(tmp_path, saved, no_unpickling, data):
    """Edits that keep the JSON valid (a digit for another: alpha 4.0 -> 5.0, a shape, a hash)."""
    root, meta, _ = saved
    out = tmp_path / "n"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(root, out)
    text = (out / "delta_config.json").read_text()
    digits = [i for i, c in enumerate(text) if c.isdigit()]
    i = data.draw(st.sampled_from(digits))
    new = data.draw(st.sampled_from([d for d in "0123456789" if d != text[i]]))
    (out / "delta_config.json").write_text(text[:i] + new + text[i + 1:])
    with pytest.raises(DeltaError):
        dt.load(tiny_model("bert"), out)
