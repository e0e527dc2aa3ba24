"""Importance of delta tensors by their smoothed sensitivity, and the orthogonality term of the
SVD-form factors: shared by the rank-allocating methods (``adalora`` prunes singular triplets by
it, ``increlora`` adds ranks to the modules it ranks highest). Not a method.

AdaLoRA (Zhang et al. 2023, section 3.2, eqs. (8)-(10)): the sensitivity I of a weight (AdaLoRA:
|w · ∂L/∂w| per entry; IncreLoRA: one number per module) is smoothed as
Ī ← β1 Ī + (1 - β1) I, its uncertainty as Ū ← β2 Ū + (1 - β2) |I - Ī| (with the new Ī), both
starting at zero, and the importance is Ī · Ū. The orthogonality term of a factor pair P (out, r),
Q (r, in) is [||QQᵀ - I||_F, ||PᵀP - I||_F] (AdaLoRA eq. (4), peft's form: the norms, not squared).
"""
from __future__ import annotations

import torch


class Importance:
    """EMA of the sensitivity (Ī) and of its uncertainty (Ū), per named tensor."""

    def __init__(self, beta1: float, beta2: float):
        self.beta1, self.beta2 = beta1, beta2
        self.avg: dict[str, torch.Tensor] = {}
        self.unc: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, sens: dict[str, torch.Tensor]) -> None:
        for n, s in sens.items():
            avg = self.avg.get(n, torch.zeros_like(s))
            unc = self.unc.get(n, torch.zeros_like(s))
            self.avg[n] = self.beta1 * avg + (1 - self.beta1) * s
            self.unc[n] = self.beta2 * unc + (1 - self.beta2) * (s - self.avg[n]).abs()

    def score(self, name: str) -> torch.Tensor | None:
        """Ī · Ū of `name` (None before its first update)."""
        if name not in self.avg:
            return None
        return self.avg[name] * self.unc[name]


def orthogonality(a: torch.Tensor, b: torch.Tensor) -> list[torch.Tensor]:
    """[||A Aᵀ - I||_F, ||Bᵀ B - I||_F] for A = Q (r, in) and B = P (out, r)."""
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return [torch.linalg.matrix_norm(a @ a.T - eye), torch.linalg.matrix_norm(b.T @ b - eye)]
