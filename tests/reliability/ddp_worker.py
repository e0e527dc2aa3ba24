"""Run under `torchrun --standalone --nproc_per_node 2` (see test_distributed.py):
1. LoRA and full fine-tuning of tiny-llama through `train_one`, a per-process batch of 4 (global
   8), into OUT/lora and OUT/full;
2. FSDP2 (`fully_shard`, per block + the root) around a LoRA DeltaModel on tiny BERT: three SGD
   steps, the delta's full tensors written to OUT/fsdp.safetensors by process 0."""
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from deltatune.bench import Budget, SuiteConfig
from deltatune.bench.single import train_one

out = sys.argv[1]
for method, steps in (("lora:r=4", 4), ("full", 2)):
    cfg = SuiteConfig(model="tiny-llama", budget=Budget(steps=steps, batch_size=4, eval_every=steps, dev_size=32),
                      quiet=True, threads=1)
    train_one(cfg, "SST-2", method, 0, f"{out}/{method.split(':')[0]}")


def fsdp_lora():
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    import deltatune as dt
    from deltatune.models import tiny_inputs, tiny_model

    model = tiny_model("bert", task="cls")
    torch.manual_seed(0)
    dm = dt.wrap(model, dt.LoRAConfig(r=4))
    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(dm)  # the delta's tensors live under the root: sharded with it
    opt = torch.optim.SGD([p for p in dm.parameters() if p.requires_grad], lr=0.5)
    dm.eval()  # no dropout: the draws of two processes could not match one process's
    x = tiny_inputs(model, batch=4)  # every process the same batch: the average is that batch's
    for _ in range(3):
        dm(**x, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        opt.step()
        opt.zero_grad()
    full = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().contiguous()
            for n, p in dm.named_parameters() if p.requires_grad}
    if dist.get_rank() == 0:
        save_file(full, f"{out}/fsdp.safetensors")


fsdp_lora()
dist.barrier()
