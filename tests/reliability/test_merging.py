"""Merging gives the base back exactly (issue 18, "Wrapping and merging"): ten merge/unmerge cycles
restore every base tensor bit for bit in float32, float16 and bfloat16 for every mergeable method
(and the sparse methods' compact form); an optimizer step, a hand edit or a load between merge()
and unmerge() never leaves the base wrong; ``merge(exact=False)`` keeps no copy and drifts by no
more than the float rounding the docs state."""
import pytest
import torch

import deltatune as dt
from deltatune.models import logits_of, tiny_inputs, tiny_model

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# every mergeable method (and variants whose merge differs), as (id, config, arch)
MERGEABLE = [
    ("lora", {"method": "lora", "r": 2}, "bert"),
    ("lora-dora", {"method": "lora", "r": 2, "dora": True}, "bert"),
    ("lora-gpt2-conv1d", {"method": "lora", "r": 2, "targets": ["c_attn", "c_fc"]}, "gpt2"),
    ("lora-embedding", {"method": "lora", "r": 2, "targets": ["word_embeddings"]}, "bert"),
    ("adalora", {"method": "adalora", "init_r": 3, "target_r": 2, "total_step": 10}, "bert"),
    ("ia3", {"method": "ia3"}, "bert"),
    ("ia3-feedforward", {"method": "ia3", "targets": ["query", "output.dense"], "feedforward": ["output.dense"]},
     "bert"),
    ("vera", {"method": "vera", "r": 4}, "bert"),
    ("loha", {"method": "loha", "r": 2}, "bert"),
    ("lokr", {"method": "lokr", "r": 2}, "bert"),
    ("bitfit", {"method": "bitfit"}, "bert"),
    ("layernorm", {"method": "layernorm"}, "bert"),
    ("partial", {"method": "partial", "last_k": 1}, "bert"),
    ("diff_pruning", {"method": "diff_pruning"}, "bert"),
    ("lt_sft", {"method": "lt_sft"}, "bert"),
    ("mask", {"method": "mask"}, "bert"),
    ("lora-t5", {"method": "lora", "r": 2}, "t5"),
    ("dylora", {"method": "dylora", "r": 4, "r_min": 1}, "bert"),
    ("dylora-rank", {"method": "dylora", "r": 4, "rank": 2}, "bert"),
    ("lora_fa", {"method": "lora_fa", "r": 2}, "bert"),
    ("delta_lora", {"method": "delta_lora", "r": 2, "start_step": 0}, "bert"),
    ("increlora", {"method": "increlora", "init_r": 1, "target_r": 2, "total_step": 10}, "bert"),
    ("qalora", {"method": "qalora", "r": 2, "group_size": 8}, "bert"),
    ("loraprune", {"method": "loraprune", "r": 2, "total_step": 10}, "bert"),
]
SWITCHABLE = ["diff_pruning", "lt_sft", "mask"]


def randomized(config, arch, dtype, seed=0, compact=False):
    """A wrapped tiny model (cast to `dtype` first) whose delta is far from the identity."""
    model = tiny_model(arch).to(dtype)
    dm = dt.wrap(model, config)
    g = torch.Generator().manual_seed(seed)

    def noise():
        with torch.no_grad():
            for p in dm.trainable_parameters():
                p.add_((torch.randn(p.shape, generator=g) * 0.3).to(p.dtype))
    if compact:
        noise()  # picks which entries the switch keeps
        dm.get_delta("default").switch()
    noise()  # on the kept entries too (lt_sft rewinds them to zero)
    return dm


def base_state(dm):
    return {k: v.detach().clone() for k, v in dm.model.state_dict().items()}


def assert_bit_exact(dm, before):
    after = dm.model.state_dict()
    bad = [k for k in before if not torch.equal(after[k], before[k])]
    assert not bad, f"{len(bad)} base tensors moved, e.g. {bad[0]}: max " \
                    f"{(after[bad[0]].double() - before[bad[0]].double()).abs().max().item():.3g}"


CASES = [(i, c, a, False) for i, c, a in MERGEABLE] + \
        [(f"{i}-compact", c, a, True) for i, c, a in MERGEABLE if i in SWITCHABLE]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("case, config, arch, compact", CASES, ids=[c[0] for c in CASES])
def test_ten_merge_unmerge_cycles_are_bit_exact(case, config, arch, compact, dtype):
    dm = randomized(config, arch, dtype, compact=compact)
    before = base_state(dm)
    x = tiny_inputs(dm.model)
    unmerged = logits_of(dm, x)
    dm.merge()
    changed = [k for k in before if not torch.equal(dm.model.state_dict()[k], before[k])]
    assert changed, "the merge wrote nothing: the test would prove nothing"
    if dtype == torch.float32:
        assert torch.allclose(logits_of(dm, x), unmerged, atol=1e-4)
    dm.unmerge()
    for _ in range(9):
        dm.merge()
        dm.unmerge()
    assert_bit_exact(dm, before)
    assert torch.equal(logits_of(dm, x), unmerged)  # and the delta runs as before


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_stacked_merges_of_two_deltas_on_one_weight_unmerge_exactly(dtype):
    dm = randomized({"method": "lora", "r": 2}, "bert", dtype)
    dm.add("ia3", {"method": "ia3", "targets": ["query", "value"]})
    with torch.no_grad():
        for p in dm.get_delta("ia3").parameters():
            p.add_(0.5)
    dm.activate("default", "ia3")
    before = base_state(dm)
    for _ in range(10):
        dm.merge("default")
        dm.merge("ia3")
        dm.unmerge()
    assert_bit_exact(dm, before)


OPT_CASES = [c for c in MERGEABLE if c[0] in ("lora", "lora-dora", "ia3", "vera", "loha", "lokr", "bitfit",
                                               "diff_pruning", "mask", "adalora")]


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "no-copy"])
@pytest.mark.parametrize("how", ["adam-step", "stale-grad-sgd", "hand-edit", "load-state"])
@pytest.mark.parametrize("case, config, arch", OPT_CASES, ids=[c[0] for c in OPT_CASES])
def test_changing_the_delta_while_merged_never_leaves_the_base_wrong(case, config, arch, how, exact):
    """The optimizer moves a merged delta (Adam's momentum; a gradient left from before the merge),
    or the user edits or reloads it: unmerge still gives the base back, and the delta keeps its
    new values, which then run."""
    dm = randomized(config, arch, torch.float32)
    before = base_state(dm)
    x = tiny_inputs(dm.model)
    params = dm.trainable_parameters()
    opt = torch.optim.Adam(params, lr=0.3) if how == "adam-step" else torch.optim.SGD(params, lr=5.0)
    dm(**x).logits.float().pow(2).sum().backward()
    if how == "adam-step":
        opt.step()  # builds momentum; the step after merge moves the delta with no new gradient
        opt.zero_grad(set_to_none=False)
    values = {k: v.clone() for k, v in dm.get_delta("default").state_dict().items()}
    dm.merge(exact=exact)
    with torch.no_grad():
        if how in ("adam-step", "stale-grad-sgd"):
            opt.step()
        elif how == "hand-edit":
            for p in params:
                p.mul_(-2.0).add_(1.0)
        else:
            dm.get_delta("default").load_state_dict({k: v * 3 - 1 if v.is_floating_point() else v
                                                    for k, v in values.items()})
    now = dm.get_delta("default").state_dict()
    assert any(not torch.equal(now[k], values[k]) for k in values), "nothing changed the delta"
    dm.unmerge()
    if exact:
        assert_bit_exact(dm, before)
    else:
        after = dm.model.state_dict()
        worst = max((after[k] - before[k]).abs().max().item() for k in before)
        assert worst < 1e-5, worst  # rounding only; the 1.8 came from the changed delta
    with dm.disabled():
        base_out = logits_of(dm, x)
    fresh = dt.wrap(tiny_model(arch), config)
    fresh.get_delta("default").load_state_dict(now)
    assert torch.allclose(logits_of(dm, x), logits_of(fresh, x), atol=1e-5)  # the new values run
    with fresh.disabled():
        assert torch.allclose(base_out, logits_of(fresh, x), atol=1e-6 if not exact else 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_no_copy_merge_keeps_no_copy_and_drifts_only_by_rounding(dtype):
    """The memory opt-out: no base copy is kept, and ten cycles drift by at most ten roundings of
    the merged weight (per cycle: one of W + dW, one of the subtraction), as docs/errors.md states."""
    dm = randomized({"method": "lora", "r": 2}, "bert", dtype)
    delta = dm.get_delta("default")
    before = base_state(dm)
    eps = torch.finfo(dtype).eps
    bound = {}
    for key, layer in delta.layers.items():
        if hasattr(layer, "update"):
            w = dm.model.get_submodule(key.replace("/", ".")).weight
            bound[key] = 10 * 2 * eps * (w.double().abs().max() + layer.update().double().abs().max()).item()
    for _ in range(10):
        dm.merge(exact=False)
        assert delta._base_copy is None
        dm.unmerge()
    for key, limit in bound.items():
        path = key.replace("/", ".") + ".weight"
        assert (dm.model.state_dict()[path].double() - before[path].double()).abs().max().item() <= limit
    dm.merge()
    assert delta._base_copy  # the default keeps one
    dm.unmerge()
    assert delta._base_copy is None  # and lets it go
