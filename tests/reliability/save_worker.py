"""Saves into one directory forever: generation g has every delta tensor equal to g, and the
directory alternates between 2 deltas, 1 delta and 3 deltas, of rank 3, 2 and 4 (the kill test's
subject; argv[2] is the format; a config torn from its weights then cannot load). Prints "ready"
after the first save."""
import sys

import torch

import deltatune as dt
from deltatune.models import tiny_model

out, fmt = sys.argv[1], sys.argv[2]
models = {}
for count in (1, 2, 3):
    dm = dt.wrap(tiny_model("bert"), dt.LoRAConfig(r=count + 1, modules_to_save=[]), name="default")
    for i in range(1, count):
        dm.add(f"d{i}", dt.LoRAConfig(r=count + 1, modules_to_save=[]))
    models[count] = dm
g = 0
while True:
    g += 1
    dm = models[(2, 1, 3)[g % 3]]
    with torch.no_grad():
        for p in dm.parameters():
            if p.requires_grad:
                p.fill_(float(g))
    dm.save(out, format=fmt)
    if g == 1:
        print("ready", flush=True)
