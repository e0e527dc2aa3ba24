"""Run under `torchrun --nproc_per_node 2`: trains LoRA and full fine-tuning on tiny-llama with
a per-process batch of 4 (global 8) into OUT/lora and OUT/full (see test_distributed.py)."""
import sys

from deltatune.bench import Budget, SuiteConfig
from deltatune.bench.single import train_one

out = sys.argv[1]
for method, steps in (("lora:r=4", 4), ("full", 2)):
    cfg = SuiteConfig(model="tiny-llama", budget=Budget(steps=steps, batch_size=4, eval_every=steps, dev_size=32),
                      quiet=True, threads=1)
    train_one(cfg, "SST-2", method, 0, f"{out}/{method.split(':')[0]}")
