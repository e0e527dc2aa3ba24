"""peft fields and files deltatune cannot convert fail clearly, naming the field; defaults pass."""
import json

import pytest

import deltatune as dt
from deltatune.models import tiny_model
from peft_helpers import peft_adapter


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    path = tmp_path_factory.mktemp("peft")
    peft_adapter(path, "bert", "cls", target_modules=["query", "value"])
    return path


def edited(adapter, tmp_path, **changes):
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(changes)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    return tmp_path


@pytest.mark.parametrize("field,value", [
    ("layer_replication", [[0, 2], [1, 2]]),
    ("bias", "all"),
    ("lora_bias", True),
    ("use_qalora", True),
    ("trainable_token_indices", [1, 2]),
    ("target_parameters", ["mlp.experts.down_proj"]),
    ("a_future_peft_field", 3),
])
def test_unsupported_field_is_an_error_naming_it(adapter, tmp_path, field, value):
    with pytest.raises(dt.ConfigError, match=rf"peft field {field}="):
        dt.load(tiny_model("bert", "cls"), edited(adapter, tmp_path, **{field: value}))


# pissa and olora load (recomputed from the pretrained base as peft does: tests/methods/
# test_lora_init.py); what stays refused is what neither deltatune nor peft can rebuild from the
# pretrained base, each with its reason and the way out
@pytest.mark.parametrize("value,why", [
    ("pissa_niter_4", "draws the randomized SVD again.*path_initial_model_for_weight_conversion"),
    ("loftq", "bitsandbytes NF4.*init='loftq'"),
    ("corda", "deltatune converts True, False, 'gaussian'.*'pissa' and 'olora'"),
    ("eva", "deltatune converts"), ("orthogonal", "deltatune converts"), (1, "deltatune converts"),
])
def test_init_that_cannot_be_rebuilt_is_refused_with_its_reason(adapter, tmp_path, value, why):
    with pytest.raises(dt.ConfigError, match=rf"(?s)peft field init_lora_weights={value!r}.*{why}"):
        dt.load(tiny_model("bert", "cls"), edited(adapter, tmp_path, init_lora_weights=value))


def test_pissa_and_olora_are_no_longer_refused(adapter, tmp_path):
    for init in ("pissa", "olora"):
        dm = dt.load(tiny_model("bert", "cls"), edited(adapter, tmp_path, init_lora_weights=init))
        assert dm.get_delta("default").config.init == init


def test_peft_olora_on_conv1d_is_refused(tmp_path):
    """peft's olora_init factorizes a Conv1D's stored (in, out) matrix (square c_proj: it runs), a
    split deltatune does not make: refused, naming the module and the converted form."""
    peft_adapter(tmp_path, "gpt2", target_modules=["attn.c_proj"], init_lora_weights="olora")
    with pytest.raises(dt.CheckpointError, match=r"'olora' on Conv1D module .*c_proj.*rank 2r"):
        dt.load(tiny_model("gpt2"), tmp_path)


def test_all_linear_and_missing_targets_are_refused(adapter, tmp_path):
    with pytest.raises(dt.ConfigError, match="all-linear"):
        dt.load(tiny_model("bert", "cls"), edited(adapter, tmp_path, target_modules="all-linear"))
    with pytest.raises(dt.ConfigError, match="target_modules=None"):
        dt.load(tiny_model("bert", "cls"), edited(adapter, tmp_path, target_modules=None))


def test_default_valued_fields_are_fine(adapter, tmp_path):
    path = edited(adapter, tmp_path, a_future_peft_field=None, layer_replication=None, bias="none",
                  megatron_core="megatron.core", qalora_group_size=16, fan_in_fan_out=True)
    dm = dt.load(tiny_model("bert", "cls"), path)
    assert len(dm.get_delta("default").paths()) == 4


def test_other_peft_types_are_named(adapter, tmp_path):
    with pytest.raises(dt.CheckpointError, match="peft BOFT adapter.*LORA"):
        dt.load(tiny_model("bert", "cls"), edited(adapter, tmp_path, peft_type="BOFT"))


def test_dora_on_embedding_is_refused(tmp_path):
    peft_adapter(tmp_path, "bert", "cls", target_modules=["word_embeddings", "query"], use_dora=True)
    with pytest.raises(dt.ConfigError, match="DoRA supports Linear and Conv1D"):
        dt.load(tiny_model("bert", "cls"), tmp_path)


def test_wrong_base_model_is_a_checkpoint_error(adapter):
    with pytest.raises(dt.CheckpointError, match="shape"):
        dt.load(tiny_model("bert", "cls", hidden_size=48), adapter)


def test_changed_targets_do_not_fit_the_tensors(adapter, tmp_path):
    with pytest.raises(dt.CheckpointError, match="missing tensors"):
        dt.load(tiny_model("bert", "cls"), edited(adapter, tmp_path, target_modules=["query", "value", "key"]))


def test_missing_weights_and_bad_config(adapter, tmp_path):
    (tmp_path / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    with pytest.raises(dt.CheckpointError, match="neither adapter_model.safetensors nor"):
        dt.load(tiny_model("bert", "cls"), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(dt.CheckpointError, match="no 'peft_type'"):
        dt.load(tiny_model("bert", "cls"), tmp_path)


def test_methods_without_peft_twin_refuse_peft_format(tmp_path):
    dm = dt.wrap(tiny_model("bert", "cls"), {"method": "bitfit"})
    with pytest.raises(dt.ConfigError, match="'bitfit' has no peft equivalent"):
        dm.save(str(tmp_path), format="peft")
    assert not any(tmp_path.iterdir())
