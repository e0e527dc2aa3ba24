"""summary(): per delta its method, trainable parameters, share of the base, and size on disk."""
from __future__ import annotations

from typing import Any

from safetensors.torch import save as st_save


class Summary(list):
    """A list of row dicts that prints as a table."""

    COLUMNS = ("name", "method", "active", "merged", "trainable", "percent", "disk_bytes")

    def __str__(self) -> str:
        rows = [self.COLUMNS] + [tuple(_fmt(r[c]) for c in self.COLUMNS) for r in self]
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(self.COLUMNS))]
        lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)) for r in rows]
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}%"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def base_parameter_count(dm) -> int:
    return sum(p.numel() for p in dm.model.parameters())


def summary(dm) -> Summary:
    base = base_parameter_count(dm)
    rows = Summary()
    for name in dm.deltas:
        delta = dm.get_delta(name)
        trainable = sum(p.numel() for p in delta.parameters() if p.requires_grad) - delta.masked_count()
        tensors = {k: v.detach().contiguous().cpu() for k, v in delta.delta_state_dict().items()}
        rows.append({
            "name": name, "method": delta.config.method, "active": name in dm.active,
            "merged": name in dm.merged, "trainable": trainable,
            "percent": 100.0 * trainable / max(base, 1), "disk_bytes": len(st_save(tensors)),
        })
    return rows
