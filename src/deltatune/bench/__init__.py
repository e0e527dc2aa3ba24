"""The benchmark harness: methods x tasks x seeds against full fine-tuning, measuring performance,
convergence and efficiency the way the delta-tuning literature does (``deltatune bench``)."""
from __future__ import annotations

from .loop import Budget
from .methods import FULL_LR, MethodSpec, default_methods, parse_method
from .suite import DEFAULT_TASKS, SuiteConfig, run_suite
from .tasks import Examples, GenExamples, Task, available_tasks, file_task, get_task, parse_task, register_task, verify_glue

__all__ = [
    "Budget", "DEFAULT_TASKS", "Examples", "FULL_LR", "GenExamples", "MethodSpec", "SuiteConfig",
    "Task", "available_tasks", "default_methods", "file_task", "get_task", "parse_method",
    "parse_task", "register_task", "run_suite", "verify_glue",
]
