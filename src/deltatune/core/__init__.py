"""The shared core: registry, configs, targets, hooks, deltas, the model wrapper and state I/O."""
