"""Bit-packed boolean masks: 8 entries a byte, so a frozen mask costs numel / 8 bytes on disk."""
from __future__ import annotations

import torch

_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as uint8, 8 entries a byte (most significant bit first, zero padded)."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    return (flat.view(-1, 8) << _SHIFTS.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The boolean tensor of `shape` that ``pack_bits`` packed (padding bits are ignored)."""
    numel = int(torch.Size(shape).numel())
    flat = (bits.view(-1, 1) >> _SHIFTS.to(bits.device)) & 1
    return flat.view(-1)[:numel].view(shape).bool()


def packed_size(shape: tuple[int, ...]) -> int:
    """Bytes of a packed mask of `shape` (what a loaded mask must hold)."""
    return (int(torch.Size(shape).numel()) + 7) // 8
