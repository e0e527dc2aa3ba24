"""peft LN_TUNING (full copies of norm layers) <-> deltatune's layernorm (differences to the base)."""
import pytest
import torch

import deltatune as dt
from deltatune.models import logits_of, tiny_inputs, tiny_model
from peft_helpers import peft_logits, train

ATOL = 1e-5
CASES = {
    "bert-with-head": ("bert", dict(target_modules=["LayerNorm"], exclude_modules=["embeddings.LayerNorm"],
                                    task_type="SEQ_CLS")),
    "llama-rmsnorm": ("llama", dict(target_modules=["input_layernorm", "norm"])),
    "t5-regex": ("t5", dict(target_modules=r".*decoder.*layer_norm")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_ln_tuning_loads_and_goes_back(tmp_path, case):
    from peft import LNTuningConfig, get_peft_model

    arch, kwargs = CASES[case]
    model = tiny_model(arch)
    inputs = tiny_inputs(model)
    pm = get_peft_model(model, LNTuningConfig(**kwargs))
    train(pm, inputs)
    want = logits_of(pm, inputs)
    assert (want - logits_of(tiny_model(arch), inputs)).abs().max() > 1e-3
    pm.save_pretrained(str(tmp_path / "peft"))
    dm = dt.load(tiny_model(arch), tmp_path / "peft")
    assert dm.get_delta("default").config.method == "layernorm"
    torch.testing.assert_close(logits_of(dm, inputs), want, atol=ATOL, rtol=0)
    dm.save(str(tmp_path / "back"), format="peft")
    torch.testing.assert_close(peft_logits(tmp_path / "back", arch, inputs), want, atol=ATOL, rtol=0)


def test_selected_modules_are_peft_s(tmp_path):
    from peft import LNTuningConfig, get_peft_model

    get_peft_model(tiny_model("bert"), LNTuningConfig(
        target_modules=["LayerNorm"], exclude_modules=["embeddings.LayerNorm"])).save_pretrained(str(tmp_path))
    paths = dt.load(tiny_model("bert"), tmp_path).get_delta("default").paths()
    assert sorted(p for p in paths if "LayerNorm" in p) == [
        f"bert.encoder.layer.{i}.{m}.LayerNorm" for i in (0, 1) for m in ("attention.output", "output")]


def test_deltatune_layernorm_saves_for_peft(tmp_path):
    dm = dt.wrap(tiny_model("bert"), {"method": "layernorm"})
    inputs = tiny_inputs(dm.model)
    train(dm, inputs)
    want = logits_of(dm, inputs)
    with dm.disabled():
        assert (logits_of(dm, inputs) - want).abs().max() > 1e-3
    dm.save(str(tmp_path), format="peft")
    torch.testing.assert_close(peft_logits(tmp_path, "bert", inputs), want, atol=ATOL, rtol=0)


def test_partial_parameters_and_merged_deltas_are_refused(tmp_path):
    dm = dt.wrap(tiny_model("bert"), {"method": "layernorm", "params": ["weight"]})
    with pytest.raises(dt.ConfigError, match="drop `params`"):
        dm.save(str(tmp_path), format="peft")
    dm = dt.wrap(tiny_model("bert"), {"method": "layernorm"})
    dm.merge()
    with pytest.raises(dt.MergeError, match="unmerge"):
        dm.save(str(tmp_path), format="peft")
