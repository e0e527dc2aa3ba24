"""Inference and I/O: base vs unmerged vs merged LoRA latency; mixed-delta batches; save/load and
switching 8 deltas, deltatune vs peft.

    python benchmarks/inference.py --model bert-base
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from common import build_model  # noqa: E402

import torch  # noqa: E402


def timeit(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def lora_cfg(model_name: str, r: int = 8) -> dict:
    from methods import QV

    return {"method": "lora", "r": r, "alpha": 16, "targets": QV[model_name], "modules_to_save": []}


def randomize(delta, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.normal_(std=0.02, generator=g)


def latency(args, model, batch) -> dict:
    import deltatune as dt

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.eval()
    out = {}
    with torch.no_grad():
        out["base_s"] = timeit(lambda: model(**inputs), args.repeats)
        dm = dt.wrap(model, lora_cfg(args.model))
        randomize(dm.get_delta("default"), 0)
        out["unmerged_s"] = timeit(lambda: dm(**inputs), args.repeats)
        dm.merge()
        out["merged_s"] = timeit(lambda: dm(**inputs), args.repeats)
        dm.unmerge()
        # mixed batch: one example per delta, 8 deltas
        names = [f"d{i}" for i in range(8)]
        for i, n in enumerate(names):
            dm.add(n, lora_cfg(args.model))
            randomize(dm.get_delta(n), i + 1)
        rows = {k: v[:1].repeat(8, *[1] * (v.dim() - 1)) for k, v in inputs.items()}

        def one_by_one():
            for i, n in enumerate(names):
                dm.activate(n)
                dm(**{k: v[i:i + 1] for k, v in rows.items()})

        out["mixed_batch_s"] = timeit(lambda: dm(**rows, deltas=names), args.repeats)
        out["delta_by_delta_s"] = timeit(one_by_one, args.repeats)
        if args.peft:
            out.update(peft_mixed(args, rows, names))
    dm.unwrap()
    return out


def peft_mixed(args, rows, names) -> dict:
    import peft

    from methods import QV

    model, _ = build_model(args.model)
    model.eval()
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=QV[args.model])
    pm = peft.get_peft_model(model, cfg, adapter_name=names[0])
    pm.eval()
    for n in names[1:]:
        pm.add_adapter(n, cfg)
    return {"peft_mixed_batch_s": timeit(lambda: pm(**rows, adapter_names=names), args.repeats)}


def io(args) -> dict:
    import deltatune as dt

    tmp = tempfile.mkdtemp()
    out = {}
    try:
        model, _ = build_model(args.model)
        dm = dt.wrap(model, lora_cfg(args.model))
        for i in range(7):
            dm.add(f"d{i}", lora_cfg(args.model))
        dm.save(os.path.join(tmp, "dt"))
        out["save_s"] = timeit(lambda: dm.save(os.path.join(tmp, "dt1"), name="default"), 5, 1)
        out["delta_bytes"] = sum(os.path.getsize(os.path.join(tmp, "dt1", f)) for f in os.listdir(os.path.join(tmp, "dt1")))
        dm.unwrap()

        def load8():
            m = dt.load(model, os.path.join(tmp, "dt"))
            for n in m.deltas:
                m.activate(n)
            m.unwrap()

        out["load8_switch_s"] = timeit(load8, 3, 1)
        if args.peft:
            out.update(peft_io(args, model, tmp))
    finally:
        shutil.rmtree(tmp)
    return out


def peft_io(args, model, tmp) -> dict:
    import peft

    from methods import QV

    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=QV[args.model])
    names = ["default"] + [f"d{i}" for i in range(7)]
    pm = peft.get_peft_model(model, cfg)
    for n in names[1:]:
        pm.add_adapter(n, cfg)
    pm.save_pretrained(os.path.join(tmp, "peft"), selected_adapters=names)
    base = pm.unload()

    def load8():
        p = peft.PeftModel.from_pretrained(base, os.path.join(tmp, "peft"))
        for n in names[1:]:
            p.load_adapter(os.path.join(tmp, "peft", n), adapter_name=n)
        for n in names:
            p.set_adapter(n)
        p.unload()

    return {"peft_load8_switch_s": timeit(load8, 3, 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="bert-base")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-peft", dest="peft", action="store_false")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, batch = build_model(args.model)
    res = {"model": args.model, **latency(args, model, batch), **io(args)}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
