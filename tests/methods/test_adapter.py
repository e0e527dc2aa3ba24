"""Bottleneck adapters (houlsby / pfeiffer / parallel), Compacter(++) and AdapterFusion as methods."""
import pytest
import torch
import torch.nn as nn

import deltatune as dt
from deltatune.core.delta import path_to_key
from deltatune.models import logits_of, tiny_inputs, tiny_model
from realrun import finetune
from roundtrip import reload_bit_exact

PLACEMENTS = ["houlsby", "pfeiffer", "parallel"]
# (attention sublayers, feed-forward sublayers) of the 2-layer tiny models; T5: 2 encoder blocks
# (self-attention, FFN) + 2 decoder blocks (self-attention, cross-attention, FFN)
SUBLAYERS = {"bert": (2, 2), "gpt2": (2, 2), "llama": (2, 2), "t5": (6, 4)}
D = 32  # hidden size of every tiny model


def perturb(module, std=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def n_trainable(delta):
    return sum(p.numel() for p in delta.parameters() if p.requires_grad)


@pytest.mark.parametrize("cfg", [
    dt.AdapterConfig(placement="houlsby"), dt.AdapterConfig(placement="pfeiffer"),
    dt.AdapterConfig(placement="parallel"), dt.AdapterConfig(placement="parallel", sites=["attn", "ffn"]),
    dt.AdapterConfig(layer_norm=True, activation="gelu"),
    dt.CompacterConfig(reduction_factor=4), dt.CompacterConfig.plus_plus(reduction_factor=4),
], ids=["houlsby", "pfeiffer", "parallel", "parallel-both", "ln-gelu", "compacter", "compacter++"])
def test_identity_at_init_and_training_changes_output(arch, cfg):
    model = tiny_model(arch)
    x = tiny_inputs(model)
    base = logits_of(model, x)
    dm = dt.wrap(model, cfg)
    assert torch.allclose(logits_of(dm, x), base, atol=1e-6, rtol=0)
    perturb(dm.get_delta("default"))
    assert (logits_of(dm, x) - base).abs().max() > 1e-3
    with dm.disabled():
        assert torch.equal(logits_of(dm, x), base)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_parameter_counts_closed_form(arch, placement):
    model = tiny_model(arch)
    m = D // 4
    n_attn, n_ffn = SUBLAYERS[arch]
    sites = {"houlsby": n_attn + n_ffn, "pfeiffer": n_ffn, "parallel": n_ffn}[placement]
    per_adapter = (D * m + m) + (m * D + D)  # down (weight + bias), up (weight + bias)
    dm = dt.wrap(model, dt.AdapterConfig(placement=placement, reduction_factor=4, modules_to_save=[]))
    assert n_trainable(dm.get_delta("default")) == sites * per_adapter
    dm.add("ln", dt.AdapterConfig(placement=placement, bottleneck=5, layer_norm=True, modules_to_save=[]))
    assert n_trainable(dm.get_delta("ln")) == sites * ((D * 5 + 5) + (5 * D + D) + 2 * D)


@pytest.mark.parametrize("plus_plus", [False, True])
def test_compacter_parameter_count_matches_the_paper(plus_plus):
    """n^3 shared rule parameters + 4L(k + d) (2L(k + d) for Compacter++) rank-one factors, k the
    hidden size, d the bottleneck, L the layers; plus one bias per PHM layer output."""
    n, k, L = 4, D, 2
    d = k // 4
    cfg = dt.CompacterConfig(reduction_factor=4, n=n, modules_to_save=[], placement="pfeiffer" if plus_plus else "houlsby")
    dm = dt.wrap(tiny_model("bert"), cfg)
    adapters_per_layer = 1 if plus_plus else 2
    paper = n ** 3 + 2 * adapters_per_layer * L * (k + d)
    biases = adapters_per_layer * L * (d + k)
    assert n_trainable(dm.get_delta("default")) == paper + biases
    cfg4 = dt.CompacterConfig(reduction_factor=4, n=n, rank=3, modules_to_save=[])
    dm.add("r3", cfg4)
    assert n_trainable(dm.get_delta("r3")) == n ** 3 + 2 * 2 * L * 3 * (k + d) + 2 * L * (d + k)


def test_compacter_weight_is_a_sum_of_kronecker_products():
    dm = dt.wrap(tiny_model("bert"), dt.CompacterConfig(reduction_factor=4, modules_to_save=[]))
    delta = dm.get_delta("default")
    perturb(delta)
    phm = delta.layers[path_to_key("bert.encoder.layer.1.output.dense")].adapter.up
    want = sum(torch.kron(delta.phm_rule[i], phm.s[i] @ phm.t[i]) for i in range(4))
    assert torch.allclose(phm.weight(), want, atol=1e-6)
    x = torch.randn(3, 8)
    assert torch.allclose(phm(x), x @ want + phm.bias, atol=1e-5)
    # one rule shared by every layer: saved once, at the delta's root
    keys = delta.delta_state_dict()
    assert "phm_rule" in keys and sum(k.endswith("phm_rule") for k in keys) == 1


def test_sites_per_architecture():
    def layer_paths(arch, placement):
        dm = dt.wrap(tiny_model(arch), dt.AdapterConfig(placement=placement, modules_to_save=[]))
        return dm.get_delta("default").paths()

    assert layer_paths("bert", "houlsby") == [
        "bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense",
        "bert.encoder.layer.1.attention.output.dense", "bert.encoder.layer.1.output.dense"]
    assert layer_paths("gpt2", "pfeiffer") == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    assert layer_paths("llama", "houlsby") == [
        "model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.self_attn", "model.layers.1.mlp"]
    # BERT's FFN input is seen at `intermediate` (an input tap), its output at `output.dense`
    assert layer_paths("bert", "parallel") == [
        "bert.encoder.layer.0.intermediate", "bert.encoder.layer.0.output.dense",
        "bert.encoder.layer.1.intermediate", "bert.encoder.layer.1.output.dense"]
    assert "decoder.block.0.layer.1.EncDecAttention" in layer_paths("t5", "houlsby")


def test_houlsby_and_parallel_match_a_hand_computation():
    """Houlsby: y + f(y) on both dense outputs; parallel FFN: y + 4 f(x), x the FFN input."""
    x = tiny_inputs(tiny_model("bert"))
    for placement in ("houlsby", "parallel"):
        dm = dt.wrap(tiny_model("bert"), dt.AdapterConfig(placement=placement, modules_to_save=[]))
        delta = dm.get_delta("default")
        perturb(delta)
        got = logits_of(dm, x)
        ref = tiny_model("bert")
        handles, seen = [], {}
        for i in range(2):
            ffn = f"bert.encoder.layer.{i}.output.dense"
            if placement == "houlsby":
                for path in (f"bert.encoder.layer.{i}.attention.output.dense", ffn):
                    net = delta.layers[path_to_key(path)].adapter
                    handles.append(ref.get_submodule(path).register_forward_hook(
                        lambda m, a, y, net=net: y + net.up(torch.relu(net.down(y)))))
            else:
                net = delta.layers[path_to_key(ffn)].adapter
                handles.append(ref.get_submodule(f"bert.encoder.layer.{i}.intermediate").register_forward_hook(
                    lambda m, a, y, i=i: seen.__setitem__(i, a[0])))
                handles.append(ref.get_submodule(ffn).register_forward_hook(
                    lambda m, a, y, net=net, i=i: y + 4.0 * net.up(torch.relu(net.down(seen[i])))))
        assert torch.allclose(logits_of(ref, x), got, atol=1e-6), placement


def test_uncovered_architecture_names_the_fix():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.mlp = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, h):
            h = h + self.attn(h)
            return h + self.mlp(h)

    model = nn.Sequential(Block(), Block())
    with pytest.raises(dt.TargetError, match=r"sublayers=\{'attn_block'"):
        dt.wrap(model, dt.AdapterConfig())
    dm = dt.wrap(model, dt.AdapterConfig(sublayers={"attn_block": r"\d+\.attn", "ffn_block": r"\d+\.mlp"},
                                         bottleneck=2))
    assert dm.get_delta("default").paths() == ["0.attn", "0.mlp", "1.attn", "1.mlp"]
    dm.add("named", dt.AdapterConfig(targets=["mlp"], bottleneck=2, placement="parallel"))
    assert dm.get_delta("named").paths() == ["0.mlp", "1.mlp"]
    h = torch.randn(2, 8)
    assert torch.equal(dm(h), model[1](model[0](h)))


def test_config_errors():
    with pytest.raises(dt.ConfigError, match="placement"):
        dt.AdapterConfig(placement="serial")
    with pytest.raises(dt.ConfigError, match="sites"):
        dt.AdapterConfig(sites=["mlp"])
    with pytest.raises(dt.ConfigError, match="sublayers"):
        dt.AdapterConfig(sublayers={"attention": "x"})
    with pytest.raises(dt.ConfigError, match="not divisible by n=4"):
        dt.wrap(tiny_model("bert"), dt.CompacterConfig(bottleneck=6))
    assert dt.config_from_dict(dt.CompacterConfig.plus_plus().to_dict()).placement == "pfeiffer"
    with pytest.raises(dt.MergeError, match="cannot be merged"):
        dt.wrap(tiny_model("bert"), dt.AdapterConfig()).merge()


@pytest.mark.parametrize("cfg", [dt.AdapterConfig(), dt.AdapterConfig(placement="parallel"),
                                 dt.CompacterConfig(reduction_factor=4)], ids=["houlsby", "parallel", "compacter"])
def test_save_load_bit_exact(tmp_path, arch, cfg):
    dm = dt.wrap(tiny_model(arch), cfg)
    perturb(dm.get_delta("default"))
    reload_bit_exact(dm, arch, tmp_path)


def test_gradients_only_on_the_active_adapter(arch):
    model = tiny_model(arch, task="cls")
    x = tiny_inputs(model)
    x.pop("decoder_input_ids", None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dm = dt.wrap(model, dt.AdapterConfig(reduction_factor=4), name="a")
    dm.add("b", dt.AdapterConfig(placement="parallel"))
    dm.train()
    dm(**x, labels=torch.tensor([0, 1])).loss.backward()
    for n, p in dm.named_parameters():
        assert (p.grad is not None) == n.startswith("delta_modules.a."), n
    ups = [p.grad for n, p in dm.get_delta("a").named_parameters() if n.endswith("up.weight")]
    assert ups and all(g.abs().sum() > 0 for g in ups)  # the zero up-projection still learns
    torch.optim.SGD(dm.trainable_parameters(), lr=0.1).step()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch_, second", [("gpt2", "houlsby"), ("llama", "houlsby"), ("bert", "parallel")])
def test_adapters_run_per_example(arch_, second):
    """A mixed batch (example i runs delta names[i]) equals each delta run alone on its rows."""
    model = tiny_model(arch_)
    x = tiny_inputs(model, batch=3)
    dm = dt.wrap(model, dt.AdapterConfig(modules_to_save=[]), name="a")
    dm.add("b", dt.AdapterConfig(placement=second, modules_to_save=[]))
    perturb(dm.get_delta("a"), seed=1)
    perturb(dm.get_delta("b"), seed=2)
    alone = {}
    for n in ("a", "b"):
        dm.activate(n)
        alone[n] = logits_of(dm, x)
    with dm.disabled():
        alone[None] = logits_of(dm, x)
    names = ["b", None, "a"]
    with torch.no_grad():
        mixed = dm(**x, deltas=names).logits
    for i, n in enumerate(names):
        assert torch.allclose(mixed[i], alone[n][i], atol=1e-5), (i, n)


def test_houlsby_adapter_learns_sst2_on_real_model():
    before, after, dm = finetune(dt.AdapterConfig(placement="houlsby"), steps=120, lr=2e-3)
    print(f"Houlsby adapter SST-2 dev accuracy: untrained {before:.3f} -> {after:.3f}")
    assert before < 0.6
    assert after >= 0.75
