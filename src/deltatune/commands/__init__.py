"""CLI sub-commands, one module each (see deltatune/cli.py)."""
