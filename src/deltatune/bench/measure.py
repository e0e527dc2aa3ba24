"""Peak memory of a training cell, and a description of the machine for the results.

CPU: the process's resident set size (RSS), sampled by a background thread (the OS keeps no
per-interval peak); freed heap is handed back to the OS first (glibc ``malloc_trim``, after the
runner's ``accelerator.free_memory()`` collected garbage) so that a previous run's memory does not
hide this one's growth. CUDA: the allocator's own peak counter.

Step times are only as good as the machine was quiet: ``others`` is the number of CPU cores that
other processes kept busy, on average, over the block (the machine's busy time minus this
process's), so a summary can mark times measured on a shared machine instead of passing them off.
"""
from __future__ import annotations

import ctypes
import os
import platform
import threading
from typing import Any

import torch

MB = 1024 * 1024


def _trim() -> None:
    """Hand freed heap back to the OS (the caller has run the garbage collector already)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to hand back
        pass


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _busy_seconds() -> tuple[float, float, float]:
    """(wall clock, CPU seconds the whole machine was busy, CPU seconds of this process)."""
    import time

    import psutil

    m, me = psutil.cpu_times(), psutil.Process().cpu_times()
    # Linux counts guest time inside user / nice as well: leave it out of the sum, or it counts twice
    not_busy = ("idle", "iowait", "guest", "guest_nice")
    busy = sum(v for k, v in m._asdict().items() if k not in not_busy)
    return time.monotonic(), busy, me.user + me.system


class PeakMemory:
    """Context manager: ``start_mb`` when entered, ``peak_mb`` over the block, ``kind``, and
    ``others`` (cores other processes kept busy meanwhile, on average)."""

    def __init__(self, device: torch.device, interval: float = 0.01):
        self.device, self.interval = device, interval
        self.kind = "cuda_allocated" if device.type == "cuda" else "cpu_rss"
        self.start_mb = self.peak_mb = self.others = 0.0
        self._stop = threading.Event()
        self._peak = 0

    def __enter__(self) -> PeakMemory:
        _trim()
        self._busy = _busy_seconds()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mb = torch.cuda.memory_allocated(self.device) / MB
        else:
            self._peak = _rss()
            self.start_mb = self._peak / MB
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss())

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / MB
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self._peak, _rss()) / MB
        (t0, all0, me0), (t1, all1, me1) = self._busy, _busy_seconds()
        self.others = max(0.0, ((all1 - all0) - (me1 - me0)) / max(t1 - t0, 1e-9))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, num_processes: int = 1, mixed_precision: str = "no") -> dict[str, Any]:
    import accelerate
    import transformers

    from ..version import __version__

    env = {
        "deltatune": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "accelerate": accelerate.__version__,
        "platform": platform.platform(), "device": str(device), "cpu": cpu_name(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "num_processes": num_processes, "mixed_precision": mixed_precision,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def machine_line(env: dict[str, Any]) -> str:
    where = env.get("gpu") or f"{env.get('cpu')} ({env.get('cpu_count')} cores, {env.get('torch_threads')} threads)"
    return (f"{where}; {env.get('num_processes')} process(es), precision {env.get('mixed_precision')}; "
            f"torch {env.get('torch')}, transformers {env.get('transformers')}, deltatune {env.get('deltatune')}")
