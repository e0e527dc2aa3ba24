"""LoftQ (Li et al. 2023) vs plain QLoRA init: how close the quantized start is to the pretrained weights.

On the shipped MiniLM (real weights, offline), for the query / value projections of all 6 layers
("qv") and for every Linear of the encoder ("all": query, key, value, attention output,
intermediate, output), it reports the relative Frobenius error of the model the fine-tune starts
from:

- QLoRA: B = 0, so the start is nf4(W) and the error is ||W - nf4(W)||_F / ||W||_F;
- LoftQ (``LoRAConfig(init="loftq", loftq_iter=T)``): ||W - (Q + s B A)||_F / ||W||_F, with Q the NF4
  base the init installs (deltatune's NF4: blocks of 64, double-quantized scales) and s B A the
  delta's update as the layer computes it.

``agg``: over all the modules together (sqrt of summed squares over sqrt of summed ||W||^2);
``mean``: the mean of the per-module ratios. s = alpha / r does not change the error (B, A carry
1/sqrt(s) each); ``peft_scaling`` shows what peft's ``loftq_init`` would start from at T = 1 with
alpha = 2r (s = 2): its factors leave out 1/s, so the start is Q + 2 (W - Q)_r, whose error
||R_perp||^2 + (s - 1)^2 ||R_r||^2 (R = W - Q) is QLoRA's exactly at s = 2 and worse above.

Measured (2-core CPU, one run, deterministic numbers; agg):

    set  r   QLoRA    LoftQ T=1  T=2      T=5
    qv   8   0.09327  0.08921    0.08621  0.08278
    qv   16  0.09327  0.08551    0.08107  0.07672
    all  8   0.09412  0.09039    0.08801  0.08501
    all  16  0.09412  0.08742    0.08373  0.07974

    python benchmarks/loftq_error.py [--ranks 8 16] [--iters 1 2 5] [--sets qv all]

Prints one JSON line per (set, r); the last line is the run's wall time.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import common  # noqa: E402,F401  (offline, quiet torchao)

import torch  # noqa: E402

SETS = {"qv": ["query", "value"], "all": ["query", "key", "value", "dense"]}  # "dense": both outputs, intermediate


def dense_weights(model, paths: list[str]) -> dict[str, torch.Tensor]:
    """(out, in) float32 copies of the pretrained weights."""
    from deltatune.methods._weights import weight_out_in

    return {p: weight_out_in(model.get_submodule(p)).detach().float().clone() for p in paths}


def ratio(errors: dict[str, float], norms: dict[str, float]) -> dict[str, float]:
    agg = (sum(e ** 2 for e in errors.values()) / sum(n ** 2 for n in norms.values())) ** 0.5
    mean = sum(errors[p] / norms[p] for p in errors) / len(errors)
    return {"agg": round(agg, 5), "mean": round(mean, 5)}


def qlora_errors(weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """||W - nf4(W)||_F per module, nf4 with deltatune.quantize's settings (QLoRA's)."""
    from deltatune.methods.lora import LOFTQ_BLOCK, LOFTQ_SCALER_BLOCK
    from deltatune.quant import nf4

    return {p: (w - nf4.dequantize_nf4(nf4.to_nf4(w, LOFTQ_BLOCK, LOFTQ_SCALER_BLOCK)).float()).norm().item()
            for p, w in weights.items()}


def peft_scaling_errors(weights: dict[str, torch.Tensor], r: int, s: float = 2.0) -> dict[str, float]:
    """T = 1 as peft's loftq_init computes its factors (no 1/s), used at scaling s."""
    from deltatune.methods.lora import LOFTQ_BLOCK, LOFTQ_SCALER_BLOCK
    from deltatune.quant import nf4

    out = {}
    for p, w in weights.items():
        q = nf4.dequantize_nf4(nf4.to_nf4(w, LOFTQ_BLOCK, LOFTQ_SCALER_BLOCK)).float()
        u, sv, vh = torch.linalg.svd(w - q, full_matrices=False)
        out[p] = (w - q - s * (u[:, :r] * sv[:r]) @ vh[:r]).norm().item()
    return out


def loftq_errors(model, targets: list[str], weights: dict[str, torch.Tensor], r: int, iters: int):
    """||W - (Q + s B A)||_F per module of a LoftQ delta built on a copy of the dense model."""
    import deltatune as dt
    from deltatune.methods._weights import stored_layout
    from deltatune.quant import nf4

    m = copy.deepcopy(model)
    start = time.perf_counter()
    dm = dt.wrap(m, dt.LoRAConfig(r=r, alpha=2 * r, init="loftq", loftq_iter=iters, targets=targets,
                                  layers=list(range(6)), modules_to_save=[]))
    seconds = time.perf_counter() - start
    delta = dm.get_delta("default")
    out = {}
    for path, layer in zip(delta.paths(), delta.layers.values()):
        module = m.get_submodule(path)
        q = stored_layout(module, nf4.dequantize_nf4(module.weight)).float()
        out[path] = (weights[path] - (q + layer.update().float())).norm().item()
    if sorted(out) != sorted(weights):
        raise RuntimeError(f"LoftQ placed {sorted(out)[:3]}..., the measured set is {sorted(weights)[:3]}...")
    return out, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--iters", type=int, nargs="+", default=[1, 2, 5])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    args = parser.parse_args()

    from deltatune.models import load_classifier

    begin = time.perf_counter()
    model, _ = load_classifier()
    for name in args.sets:
        paths = [n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
                 and ".encoder.layer." in n and n.endswith(tuple(SETS[name]))]
        weights = dense_weights(model, paths)
        norms = {p: w.norm().item() for p, w in weights.items()}
        qlora = ratio(qlora_errors(weights), norms)
        for r in args.ranks:
            row = {"set": name, "modules": len(paths), "r": r, "qlora": qlora}
            for t in args.iters:
                errors, seconds = loftq_errors(model, SETS[name], weights, r, t)
                row[f"loftq_T{t}"] = {**ratio(errors, norms), "init_s": round(seconds, 2)}
            row["peft_scaling_T1_s2"] = ratio(peft_scaling_errors(weights, r), norms)
            print(json.dumps(row), flush=True)
    print(json.dumps({"wall_s": round(time.perf_counter() - begin, 1)}))


if __name__ == "__main__":
    main()
