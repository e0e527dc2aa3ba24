import torch

import deltatune as dt
from deltatune.models import tiny_model
from realrun import finetune


def tuned_names(dm):
    return {k for k in dm.get_delta("default").delta_state_dict()}


def test_bitfit_trains_every_bias_only():
    model = tiny_model("bert")
    dm = dt.wrap(model, dt.BitFitConfig(modules_to_save=[]))
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert {k.replace(".diffs.", ".") for k in tuned_names(dm)} == biases


def test_layernorm_trains_norms_only(arch):
    model = tiny_model(arch)
    dm = dt.wrap(model, dt.LayerNormConfig(modules_to_save=[]))
    norm_params = {n for n, _ in model.named_parameters()
                   if "norm" in type(model.get_submodule(n.rsplit(".", 1)[0])).__name__.lower()}
    assert {k.replace(".diffs.", ".") for k in tuned_names(dm)} == norm_params


def test_partial_last_k_and_regex():
    model = tiny_model("bert")
    dm = dt.wrap(model, dt.PartialConfig(last_k=1, modules_to_save=[]))
    want = {n for n, _ in model.named_parameters() if ".layer.1." in n}
    assert {k.replace(".diffs.", ".") for k in tuned_names(dm)} == want
    dm.add("qv", dt.PartialConfig(params=r".*attention\.self\.(query|value)\.weight", modules_to_save=[]))
    keys = {k for k in dm.get_delta("qv").delta_state_dict()}
    assert len(keys) == 4 and all(k.endswith("weight") for k in keys)


def test_diff_training_leaves_base_untouched():
    model = tiny_model("bert", task="cls")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dm = dt.wrap(model, dt.BitFitConfig())
    dm.train()
    opt = torch.optim.SGD(dm.trainable_parameters(), lr=1.0)
    ids = torch.randint(3, 100, (2, 6))
    dm(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
    opt.step()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert any(p.abs().sum() > 0 for p in dm.trainable_parameters())


def test_bitfit_learns_sst2_on_real_model():
    before, after, _ = finetune(dt.BitFitConfig(), steps=60, lr=5e-3, n_dev=200)  # measured 0.535 -> 0.735
    print(f"BitFit SST-2 dev accuracy: untrained {before:.3f} -> {after:.3f}")
    assert after >= before + 0.15
