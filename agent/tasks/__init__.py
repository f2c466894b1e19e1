"""Built-in example tasks: ``digits`` (scikit-learn's 8x8 digits, MLP) and ``mnist`` (CNN).

Both implement the agent's Trainer protocol plus ``initial_weights``, ``evaluate``,
``evaluate_global``, ``predict`` and ``trainable_tensors``. See ``agent.tasks._torch``
for the options every task accepts.
"""

from __future__ import annotations

from typing import Any

from agent.tasks._torch import TorchTask
from agent.tasks.digits import DigitsTask
from agent.tasks.mnist import MnistTask
from agent.tasks.partition import client_owners, partition_indices
from agent.trainer import call_with_options
from proto.errors import InvalidInput

BUILTIN_TASKS: dict[str, type[TorchTask]] = {"digits": DigitsTask, "mnist": MnistTask}


def make_task(name: str, **options: Any) -> TorchTask:
    """Build the built-in task ``name`` with keyword ``options``."""
    task_class = BUILTIN_TASKS.get(name)
    if task_class is None:
        raise InvalidInput(f"unknown task {name!r}; built-in tasks: {sorted(BUILTIN_TASKS)}", reason="unknown_task")
    return call_with_options(task_class, options, what=f"task {name!r}")


__all__ = [
    "BUILTIN_TASKS",
    "DigitsTask",
    "MnistTask",
    "TorchTask",
    "client_owners",
    "make_task",
    "partition_indices",
]
