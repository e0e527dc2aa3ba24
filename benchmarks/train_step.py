"""Training-step time and peak memory: deltatune vs peft vs the frozen-base floor vs full FT.

    python benchmarks/train_step.py matrix --model bert-base --configs lora-qv,lora-all,ia3,prompt
    python benchmarks/train_step.py one --model bert-base --impl deltatune --config lora-qv

`matrix` runs every configuration in a fresh process (peak memory is per process), alternating the
order of deltatune and peft between repeats, and prints a Markdown table with the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from common import build_model, rss_now_mib, rss_peak_mib  # noqa: E402


def run_one(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model, batch = build_model(args.model)
    model.train()
    if args.impl == "full":
        net, params = model, list(model.parameters())
    elif args.impl == "floor":
        model.requires_grad_(False)
        emb = model.get_input_embeddings()
        emb.register_forward_hook(lambda m, i, o: o.requires_grad_())
        net, params = model, []
    elif args.impl == "deltatune":
        import deltatune as dt
        from methods import CONFIGS

        net = dt.wrap(model, CONFIGS[args.config][0](args.model))
        params = net.trainable_parameters()
    else:
        from methods import peft_wrap

        net = peft_wrap(model, args.config, args.model)
        params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    times = []
    rss_before = rss_now_mib()
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = net(**batch).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if args.impl == "deltatune":
            net.step(step)  # the methods' schedules (AdaLoRA's budget, DyLoRA's rank) run as in training
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {
        "model": args.model, "impl": args.impl, "config": args.config,
        "trainable": sum(p.numel() for p in params),
        "step_s": statistics.median(times), "step_s_min": min(times),
        "peak_rss_mib": rss_peak_mib(), "rss_before_mib": rss_before, "threads": args.threads,
    }


def spawn(model: str, impl: str, config: str, steps: int, warmup: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "one", "--model", model, "--impl", impl, "--config", config,
           "--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_matrix(args) -> list[dict]:
    from methods import CONFIGS

    rows: list[dict] = []
    configs = args.configs.split(",")
    for rep in range(args.repeats):
        jobs = [("floor", "-"), ("full", "-")]
        for c in configs:
            pair = [("deltatune", c)] + ([("peft", c)] if CONFIGS[c][1] else [])
            jobs += pair if rep % 2 == 0 else pair[::-1]
        for impl, c in jobs:
            r = spawn(args.model, impl, c, args.steps, args.warmup, args.threads)
            r["repeat"] = rep
            rows.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    def med(impl, config, key):
        vals = [r[key] for r in rows if r["impl"] == impl and r["config"] == config]
        return statistics.median(vals) if vals else None

    floor = med("floor", "-", "step_s")
    lines = ["| config | impl | trainable | step (s) | x floor | x peft (time) | peak RSS (MiB) | x peft (memory) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    seen = []
    for r in rows:
        key = (r["impl"], r["config"])
        if key in seen:
            continue
        seen.append(key)
        t, m = med(*key, "step_s"), med(*key, "peak_rss_mib")
        pt, pm = med("peft", r["config"], "step_s"), med("peft", r["config"], "peak_rss_mib")
        vs_t = f"{t / pt:.3f}" if r["impl"] == "deltatune" and pt else ""
        vs_m = f"{m / pm:.3f}" if r["impl"] == "deltatune" and pm else ""
        lines.append(f"| {r['config']} | {r['impl']} | {r['trainable']:,} | {t:.4f} | {t / floor:.3f} | "
                     f"{vs_t} | {m:.0f} | {vs_m} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["one", "matrix"])
    p.add_argument("--model", default="bert-base")
    p.add_argument("--impl", default="deltatune", choices=["deltatune", "peft", "floor", "full"])
    p.add_argument("--config", default="-")
    p.add_argument("--configs", default="lora-qv,lora-all,ia3,prompt")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None, help="append the raw JSON lines here")
    args = p.parse_args()
    if args.mode == "one":
        print(json.dumps(run_one(args)))
        return
    rows = run_matrix(args)
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
