"""`deltatune inspect PATH`: what a saved delta holds, without loading a model."""
from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="describe a saved delta (method, config, tensors, base)")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print the raw metadata as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..core.state import CONFIG_FILE, INDEX_FILE, _read_json, read_meta, read_tensors

    root = Path(args.path)
    if (root / INDEX_FILE).exists():
        index = _read_json(root / INDEX_FILE)
        print(f"{root}: {len(index.get('deltas', []))} deltas, active {index.get('active')}")
        for n in index.get("deltas", []):
            _describe(root / n, args, read_meta, read_tensors)
        return 0
    if not (root / CONFIG_FILE).exists():
        from ..errors import CheckpointError

        raise CheckpointError(f"{root} holds no {CONFIG_FILE}: not a saved deltatune delta.")
    _describe(root, args, read_meta, read_tensors)
    return 0


def _describe(root: Path, args, read_meta, read_tensors) -> None:
    meta = read_meta(root)
    if args.json:
        print(json.dumps(meta, indent=2, sort_keys=True))
        return
    tensors = read_tensors(root, meta)
    n = sum(t.numel() for t in tensors.values())
    size = (root / meta["weights"]).stat().st_size
    base = meta["base"]
    print(f"delta {meta['name']!r}: method {meta['config']['method']}, {n:,} values in "
          f"{len(tensors)} tensors, {size:,} bytes on disk")
    print(f"  base: {base.get('class')} (model_type {base.get('model_type')}), "
          f"{len(base.get('modules', {}))} modules touched")
    print(f"  saved by deltatune {meta['library_version']} (format {meta['format_version']})")
    cfg = {k: v for k, v in meta["config"].items() if v is not None}
    print(f"  config: {json.dumps(cfg, sort_keys=True)}")
