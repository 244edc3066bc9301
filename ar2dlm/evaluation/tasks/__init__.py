"""Benchmarks for evaluating a converted model: GSM8K (maths), HumanEval and MBPP (code)."""

from __future__ import annotations

from ar2dlm.errors import Ar2dlmError
from ar2dlm.evaluation.tasks.base import Sample, Task
from ar2dlm.evaluation.tasks.gsm8k import GSM8K
from ar2dlm.evaluation.tasks.humaneval import HumanEval
from ar2dlm.evaluation.tasks.mbpp import MBPP

TASKS: dict[str, type[Task]] = {"gsm8k": GSM8K, "humaneval": HumanEval, "mbpp": MBPP}


def get_task(name: str, **options) -> Task:
    """A task by name (`gsm8k`, `humaneval`, `mbpp`); options go to its constructor (e.g. fewshot_source)."""
    key = name.strip().lower()
    if key not in TASKS:
        raise Ar2dlmError(f"unknown task {name!r} (choose from {', '.join(TASKS)})")
    try:
        return TASKS[key](**options)
    except TypeError as e:
        raise Ar2dlmError(f"task {key!r}: bad option ({e})") from None


__all__ = ["GSM8K", "MBPP", "TASKS", "HumanEval", "Sample", "Task", "get_task"]
