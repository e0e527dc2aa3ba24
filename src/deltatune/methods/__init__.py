"""One module per method; each registers itself (core/registry.py imports them all)."""
