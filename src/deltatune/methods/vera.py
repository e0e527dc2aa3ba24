"""VeRA (Kopiczko et al. 2024): one pair of frozen random matrices shared by every adapted layer,
and two trainable scaling vectors per layer.

h = W x + Λ_b B Λ_d A x, with A (r, in_max) and B (out_max, r) Kaiming-uniform from a seeded
generator (each layer slices A[:, :in], B[:out, :]), λ_d = d_initial, λ_b = 0 (identity at init).
As in peft (``projection_prng_key``, ``vera_lambda_b/d``, A drawn before B on a CPU generator), so
that its checkpoints regenerate the same matrices. A and B are non-persistent buffers: a saved
delta holds only the vectors; the seed, the shapes and a checksum of A and B go to extra_state,
and loading regenerates and verifies them.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.registry import register
from ..errors import CheckpointError
from ._weights import LowRankLayer, module_dims


@dataclass
class VeRAConfig(DeltaConfig):
    """projection_prng_key: seed of the shared A and B (None: a fresh one, drawn from torch's RNG
    and saved with the delta)."""
    method: ClassVar[str] = "vera"

    r: int = 256
    projection_prng_key: int | None = 0
    d_initial: float = 0.1
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        self.check_range("r", 0, low_open=True, integer=True)
        if self.projection_prng_key is not None:
            self.check_range("projection_prng_key", 0, 2**63 - 1, integer=True)
        self.check_range("d_initial", None)
        self.check_range("dropout", 0.0, 1.0, high_open=True)


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform (gain √2, fan_in = shape[1]) from `generator`, as peft's VeRA draws it."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class Projections(nn.Module):
    """The shared frozen A and B: non-persistent buffers, rebuilt from (seed, shapes)."""

    def __init__(self, seed: int, r: int, d_in: int, d_out: int, like: torch.Tensor):
        super().__init__()
        empty = torch.empty(0, dtype=like.dtype, device=like.device)
        self.register_buffer("vera_A", empty, persistent=False)
        self.register_buffer("vera_B", empty.clone(), persistent=False)
        self.generate(seed, r, d_in, d_out)

    @torch.no_grad()
    def generate(self, seed: int, r: int, d_in: int, d_out: int) -> None:
        g = torch.Generator(device="cpu").manual_seed(seed)
        a = kaiming_uniform((r, d_in), g)
        b = kaiming_uniform((d_out, r), g)
        dtype, device = self.vera_A.dtype, self.vera_A.device
        self.vera_A = a.to(dtype=dtype, device=device)
        self.vera_B = b.to(dtype=dtype, device=device)
        self.seed = seed

    def checksum(self) -> str:
        h = hashlib.sha256()
        for t in (self.vera_A, self.vera_B):
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


class VeRALayer(LowRankLayer):
    """The shared low-rank layer with down = Λ_d A x and up = Λ_b B h, A and B this layer's slices
    of the shared projections."""

    def __init__(self, module: nn.Module, cfg: VeRAConfig, shared: Projections):
        super().__init__(cfg.dropout)
        self.d_in, self.d_out = module_dims(module)
        w = module.weight
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.d_out, dtype=w.dtype, device=w.device))
        self.vera_lambda_d = nn.Parameter(torch.full((cfg.r,), float(cfg.d_initial), dtype=w.dtype,
                                                     device=w.device))
        object.__setattr__(self, "_shared", shared)  # a reference, not a submodule: saved once

    def _a(self) -> torch.Tensor:
        return self._shared.vera_A[:, : self.d_in]

    def _b(self) -> torch.Tensor:
        return self._shared.vera_B[: self.d_out, :]

    def update(self) -> torch.Tensor:
        """Λ_b B Λ_d A as (out, in)."""
        return (self.vera_lambda_b[:, None] * self._b()) @ (self.vera_lambda_d[:, None] * self._a())

    def down(self, x: torch.Tensor) -> torch.Tensor:
        return self.vera_lambda_d * F.linear(x, self._a())

    def up(self, h: torch.Tensor) -> torch.Tensor:
        return self.vera_lambda_b * F.linear(h, self._b())


class VeRADelta(Delta):
    config_cls = VeRAConfig

    default_roles = ("query", "value")
    supported_types = (nn.Linear, Conv1D)

    def build(self, model: nn.Module) -> None:
        cfg = self.config
        targets = self.targets(model)
        dims = [module_dims(m) for _, m in targets]
        seed = cfg.projection_prng_key
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        self.projections = Projections(seed, cfg.r, max(d for d, _ in dims), max(d for _, d in dims),
                                       like=targets[0][1].weight)
        for path, module in targets:
            self.add_layer(path, VeRALayer(module, cfg, self.projections))

    def extra_state(self) -> dict[str, Any]:
        p = self.projections
        return {"projection_prng_key": p.seed, "vera_A_shape": list(p.vera_A.shape),
                "vera_B_shape": list(p.vera_B.shape), "checksum": p.checksum()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "projection_prng_key" not in state:
            raise CheckpointError("this VeRA delta was saved without its projection seed; it cannot be rebuilt.")
        p = self.projections
        (r, d_in), (d_out, _) = state["vera_A_shape"], state["vera_B_shape"]
        if [r, d_in, d_out] != [p.vera_A.shape[0], p.vera_A.shape[1], p.vera_B.shape[0]]:
            raise CheckpointError(f"the saved VeRA projections are {r}x{d_in} / {d_out}x{r}, but this "
                                  f"model and config give {tuple(p.vera_A.shape)} / {tuple(p.vera_B.shape)}: "
                                  f"load it into the base (and targets) it was trained on.")
        p.generate(int(state["projection_prng_key"]), r, d_in, d_out)
        if state.get("checksum") not in (None, p.checksum()):
            raise CheckpointError(
                "the VeRA projections regenerated from the saved seed differ from those it was trained "
                "with (the random generator changed between torch versions or devices); the delta "
                "cannot be reproduced here."
            )


register("vera", VeRAConfig, VeRADelta, family="reparameterized", lr=2e-2, paper="Kopiczko et al. 2024 (VeRA)")
