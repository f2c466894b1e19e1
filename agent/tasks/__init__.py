"""Built-in example tasks: ``digits`` (scikit-learn's 8x8 digits, MLP), ``mnist`` (CNN) and
``fashion_mnist`` (Debian's Fashion-MNIST, the same CNN and tensor names as ``mnist``).

Each implements the agent's Trainer protocol plus ``initial_weights``, ``evaluate``,
``evaluate_global``, ``predict`` and ``trainable_tensors``. See ``agent.tasks._torch``
for the options every task accepts. ``builtin_task`` is the one lookup by name, for
the agent, the CLI and the demo alike.
"""

from __future__ import annotations

from typing import Any

from agent.options import call_with_options
from agent.tasks._torch import TorchTask
from agent.tasks.digits import DigitsTask
from agent.tasks.fashion_mnist import FashionMnistTask
from agent.tasks.mnist import MnistTask
from agent.tasks.partition import client_owners, partition_indices
from proto.errors import InvalidInput

BUILTIN_TASKS: dict[str, type[TorchTask]] = {
    "digits": DigitsTask, "mnist": MnistTask, "fashion_mnist": FashionMnistTask,
}


def builtin_task(name: str) -> type[TorchTask]:
    """The built-in task class called ``name``; InvalidInput (reason "unknown_task") naming the built-ins otherwise."""
    task_class = BUILTIN_TASKS.get(name)
    if task_class is None:
        raise InvalidInput(f"unknown task {name!r}; built-in: {sorted(BUILTIN_TASKS)}", reason="unknown_task")
    return task_class


def make_task(name: str, **options: Any) -> TorchTask:
    """Build the built-in task ``name`` with keyword ``options``."""
    return call_with_options(builtin_task(name), options, what=f"task {name!r}")


__all__ = [
    "BUILTIN_TASKS",
    "DigitsTask",
    "FashionMnistTask",
    "MnistTask",
    "TorchTask",
    "builtin_task",
    "client_owners",
    "make_task",
    "partition_indices",
]
