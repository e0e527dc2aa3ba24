"""What diff_pruning, lt_sft and mask share: identity, exact merge, sparse storage, errors."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.methods._sparse_bits import pack_bits, unpack_bits
from deltatune.methods._sparse_csr import sparse_linear
from deltatune.methods._sparse_index import topk_global
from deltatune.models import logits_of, tiny_inputs, tiny_model
from sparse_util import base_params, config, make_compact, no_dropout, randomize

METHODS = ["diff_pruning", "lt_sft", "mask"]


# -- the shared helpers ------------------------------------------------------------------------
def test_pack_bits_round_trip():
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 5), (8,), (2, 3, 7)]:
        m = torch.rand(shape, generator=g) > 0.5
        bits = pack_bits(m)
        assert bits.dtype == torch.uint8 and bits.numel() == (m.numel() + 7) // 8
        assert torch.equal(unpack_bits(bits, shape), m)
    assert pack_bits(torch.tensor([True, False, False, False, False, False, False, True])).item() == 0b10000001


def test_topk_global_is_exact_over_tensors():
    scores = {"a": torch.tensor([[0.5, 3.0], [1.0, 1.0]]), "b": torch.tensor([2.0, 1.0, 0.1])}
    top = topk_global(scores, 3)  # 3.0, 2.0 and one of the three 1.0 (a tie: any one)
    assert sum(t.numel() for t in top.values()) == 3
    assert all(torch.equal(t, t.sort().values) for t in top.values())
    picked = sorted([scores["a"].view(-1)[i].item() for i in top["a"]] + [scores["b"][i].item() for i in top["b"]])
    assert picked == [1.0, 2.0, 3.0]
    with pytest.raises(dt.ConfigError, match="cannot keep"):
        topk_global(scores, 8)


@pytest.mark.parametrize("transposed", [False, True])
def test_sparse_linear_matches_dense_and_gradchecks(transposed):
    g = torch.Generator().manual_seed(0)
    out_f, in_f = 6, 5
    shape = (in_f, out_f) if transposed else (out_f, in_f)
    idx = torch.randperm(30, generator=g)[:8].sort().values.int()
    v = torch.randn(8, dtype=torch.float64, generator=g, requires_grad=True)
    x = torch.randn(2, 3, in_f, dtype=torch.float64, generator=g, requires_grad=True)
    s = torch.zeros(30, dtype=torch.float64).index_add(0, idx, v).view(shape)
    want = x @ s if transposed else x @ s.T
    assert torch.allclose(sparse_linear(x, idx, v, shape, transposed), want, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: sparse_linear(a, idx, b, shape, transposed), (x, v))


# -- every method ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_identity_at_init_and_grads_only_on_delta(arch, method):
    model = no_dropout(tiny_model(arch))  # train mode then differs only through the delta
    x = tiny_inputs(model)
    want = logits_of(model, x)
    want_train = model.train()(**x).logits.detach()
    model.eval()
    before = base_params(model)
    dm = dt.wrap(model, config(method))
    assert torch.equal(logits_of(dm, x), want)
    dm.train()
    out = dm(**x).logits
    assert torch.allclose(out, want_train, atol=1e-5)  # T5 train mode: a few ulp of noise
    out.float().pow(2).mean().backward()
    assert all(p.grad is None for p in model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in dm.trainable_parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("compact", [False, True])
def test_merge_unmerge_exact(arch, method, compact):
    model = tiny_model(arch)
    x = tiny_inputs(model)
    before = base_params(model)
    dm = dt.wrap(model, config(method, modules_to_save=[]))
    if compact:
        make_compact(dm)
    else:
        randomize(dm.get_delta("default"))
    tuned = logits_of(dm, x)
    with dm.disabled():
        assert not torch.allclose(logits_of(dm, x), tuned, atol=1e-4)
    dm.merge()
    assert torch.allclose(logits_of(dm, x), tuned, atol=1e-5)
    dm.unmerge()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert torch.equal(logits_of(dm, x), tuned)


@pytest.mark.parametrize("method", ["diff_pruning", "lt_sft"])
def test_compact_merge_leaves_untouched_entries_bit_identical(method):
    model = tiny_model("gpt2")
    before = base_params(model)
    dm = dt.wrap(model, config(method, modules_to_save=[], density=0.05))
    delta = make_compact(dm)
    k = delta.budget(0.05, None)
    assert delta.kept() == k
    dm.merge()
    changed = 0
    for path, lay in delta.compact_layers():
        for n in lay.names:
            full = f"{path}.{n}"
            p, old = model.get_parameter(full).detach().view(-1), before[full].view(-1)
            keep = torch.zeros_like(p, dtype=torch.bool)
            keep[lay.sparse.idx.get(n).long()] = True
            assert torch.equal(p[~keep], old[~keep])
            changed += int((p != old).sum())
    assert 0 < changed <= k
    dm.unmerge()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("compact", [False, True])
def test_save_load_round_trip_bit_exact(tmp_path, method, compact):
    model = tiny_model("bert", task="cls")
    x = tiny_inputs(model)
    dm = dt.wrap(model, config(method))
    if compact:
        make_compact(dm)
    else:
        randomize(dm.get_delta("default"))
    want = logits_of(dm, x)
    dm.save(tmp_path / "d")
    loaded = dt.load(tiny_model("bert", task="cls"), tmp_path / "d")
    assert torch.equal(logits_of(loaded, x), want)
    a = dm.get_delta("default").delta_state_dict()
    b = loaded.get_delta("default").delta_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert loaded.get_delta("default").is_compact == compact


def _weights(path):
    meta = json.loads((path / "delta_config.json").read_text())
    return path / meta["weights"], load_file(path / meta["weights"])


@pytest.mark.parametrize("method", ["diff_pruning", "lt_sft"])
def test_sparse_file_size_scales_with_kept_entries(tmp_path, method):
    sizes = {}
    for width, k in [(32, 50), (64, 50), (64, 400)]:
        model = tiny_model("bert", hidden_size=width, intermediate_size=2 * width)
        dm = dt.wrap(model, config(method, modules_to_save=[]))
        make_compact(dm, k=k)
        dm.save(tmp_path / f"{width}-{k}")
        file, tensors = _weights(tmp_path / f"{width}-{k}")
        data = sum(t.numel() * t.element_size() for t in tensors.values())
        assert data == 8 * k  # int32 index + float32 value per kept entry
        sizes[width, k] = file.stat().st_size - data  # the safetensors header
        assert sizes[width, k] < 150 * len(tensors)
    # the file is 8 bytes a kept entry plus a header that does not grow with the base (4x the
    # weights at width 64) or with k (its offsets only gain digits)
    assert max(sizes.values()) - min(sizes.values()) < 200


def test_finalized_mask_saves_bits(tmp_path):
    model = tiny_model("bert")
    dm = dt.wrap(model, config("mask", modules_to_save=[]))
    delta = make_compact(dm)
    dm.save(tmp_path / "m")
    _, tensors = _weights(tmp_path / "m")
    numel = sum(model.get_parameter(f"{p}.weight").numel() for p, _ in delta.compact_layers())
    assert all(t.dtype == torch.uint8 for t in tensors.values())
    assert sum(t.numel() for t in tensors.values()) == numel // 8


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["diff_pruning", "lt_sft"])
def test_corrupt_indices_are_refused(tmp_path, method):
    from safetensors.torch import save_file

    dm = dt.wrap(tiny_model("bert"), config(method, modules_to_save=[]))
    make_compact(dm, k=20)
    dm.save(tmp_path / "d")
    file, tensors = _weights(tmp_path / "d")
    key = max((k for k in tensors if ".idx." in k), key=lambda k: tensors[k].numel())
    assert tensors[key].numel() > 1
    tensors[key] = tensors[key].flip(0).contiguous()  # unsorted
    save_file(tensors, file, metadata={"format": "pt"})
    meta = json.loads((tmp_path / "d" / "delta_config.json").read_text())
    import hashlib

    meta["sha256"] = hashlib.sha256(file.read_bytes()).hexdigest()
    del meta["meta_sha256"]  # a deliberate edit (else the config's own checksum refuses it first)
    (tmp_path / "d" / "delta_config.json").write_text(json.dumps(meta))
    with pytest.raises(dt.CheckpointError, match="not sorted"):
        dt.load(tiny_model("bert"), tmp_path / "d")
    meta["extra_state"] = {"compact": True}
    (tmp_path / "d" / "delta_config.json").write_text(json.dumps(meta))
    with pytest.raises(dt.CheckpointError, match="sizes"):
        dt.load(tiny_model("bert"), tmp_path / "d")


@pytest.mark.parametrize("bad", [
    {"method": "lt_sft", "density": 0.0}, {"method": "diff_pruning", "low": 0.5},
    {"method": "diff_pruning", "high": 1.0}, {"method": "mask", "init_score": 0.001},
    {"method": "mask", "params": []}, {"method": "lt_sft", "density": 1.5},
])
def test_config_errors(bad):
    with pytest.raises(dt.ConfigError):
        dt.config_from_dict(bad)


def test_params_that_match_nothing_are_a_target_error():
    with pytest.raises(dt.TargetError, match="no parameter named"):
        dt.wrap(tiny_model("llama"), config("lt_sft", params=["bias"]))  # llama linears have no bias


@pytest.mark.parametrize("method", METHODS)
def test_switch_runs_once_and_not_while_merged(method):
    dm = dt.wrap(tiny_model("bert"), config(method))
    delta = dm.get_delta("default")
    switch = delta.start_phase2 if method == "lt_sft" else delta.finalize
    dm.merge()
    with pytest.raises(dt.MergeError, match="unmerge"):
        switch()
    dm.unmerge()
    switch()
    with pytest.raises(dt.ConfigError, match="once"):
        switch()


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
@pytest.mark.parametrize("k", [100, 5000])
def test_compact_linear_routes_match_merged_weights(arch, k):
    """Sparse weights run as a product on the output (Conv1D: transposed) up to 2% density and
    as a swapped-in W + S above; either equals the merged weights."""
    model = tiny_model(arch)
    x = tiny_inputs(model)
    dm = dt.wrap(model, config("lt_sft", modules_to_save=[]))
    delta = make_compact(dm, k=k)
    routes = [lay._by_product(model.get_submodule(p)) for p, lay in delta.compact_layers()]
    assert set(routes) == ({"weight"} if k == 100 else {None})
    if arch == "gpt2":
        assert any(isinstance(model.get_submodule(p), Conv1D) for p, _ in delta.compact_layers())
    tuned = logits_of(dm, x)
    dm.merge()
    assert torch.allclose(logits_of(dm, x), tuned, atol=1e-5)
    dm.unmerge()
