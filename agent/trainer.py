"""The `Trainer` protocol that user ML code implements, and how the agent finds one.

Weights cross this boundary as ``dict[str, np.ndarray]`` of float32 arrays -- never
framework objects -- so the daemon can encode them with safetensors and a trainer can be
written in any framework.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from agent.algorithms import (
    PROX_MU,
    SCAFFOLD_CORRECTION,
    SCAFFOLD_LR,
    SCAFFOLD_STEPS,
    momentum_step_size,
    prox_mu,
    proximal_gradient,
    requested_algorithms,
    scaffold_correction,
    unsupported_algorithms,
)
from agent.options import call_with_options
from proto.errors import InvalidInput

Weights = dict[str, np.ndarray]

# the non-IID algorithms' helpers, for trainers of users' own (see Trainer's docstring)
__all__ = [
    "PROX_MU",
    "SCAFFOLD_CORRECTION",
    "SCAFFOLD_LR",
    "SCAFFOLD_STEPS",
    "Trainer",
    "Weights",
    "has_evaluate",
    "load_trainer",
    "momentum_step_size",
    "prox_mu",
    "proximal_gradient",
    "requested_algorithms",
    "scaffold_correction",
    "unsupported_algorithms",
]


@runtime_checkable
class Trainer(Protocol):
    """Local training on a device's own data.

    Optional methods the agent uses when present:
    ``evaluate(weights) -> dict[str, float]`` (local held-out metrics),
    ``initial_weights() -> Weights`` (to create a federation's base model),
    ``trainable_tensors() -> list[str] | None`` (None means all tensors change).

    ``round_config`` is the federation's (the aggregator's ``round_config``, values as strings)
    plus ``round``. Besides the trainer's own keys (``epochs``, ``lr``, ...) it may name a
    non-IID algorithm the local objective must follow:

    - ``prox_mu`` (FedProx): minimize ``loss(w) + prox_mu / 2 * ||w - w_base||^2``, where
      ``w_base`` is the ``weights`` given to ``train``; in gradient terms, add
      ``proximal_gradient(w, w_base, mu)`` to the loss gradient at every step. Read it with
      ``prox_mu(round_config)``.
    - ``scaffold`` (SCAFFOLD): the agent hands over ``scaffold_correction(round_config)``, the
      tensor-by-tensor ``c - c_i`` to add to the loss gradient of every trained tensor at every
      local step; the trainer reports the K steps it took as metric ``scaffold_steps`` and their
      step size eta as ``scaffold_lr`` (for momentum SGD: ``momentum_step_size(lr, momentum, K)``).
      The agent then computes the variate update (option II) and sends it with the update.

    A trainer declares what it implements in an optional ``round_algorithms`` attribute
    (e.g. ``frozenset({"fedprox", "scaffold"})``); the agent warns when a federation asks for one its
    trainer does not declare, since the update would silently be plain FedAvg.
    """

    def train(
        self, weights: Weights, round_config: Mapping[str, Any]
    ) -> tuple[Weights, int, dict[str, float]]:
        """Train from ``weights``; return (new weights, number of samples, metrics)."""
        ...


def has_evaluate(trainer: object) -> bool:
    """Whether ``trainer`` offers the optional ``evaluate(weights)``."""
    return callable(getattr(trainer, "evaluate", None))


def trainer_target(spec: str) -> Any:
    """What a trainer ``spec`` names, not yet built: a built-in task's class (``"digits"``, ``"mnist"``,
    ``"fashion_mnist"``), or the object ``"module:object"`` names (a class, a factory or a ready trainer)."""
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidInput(f"trainer spec must be a non-empty string, got {spec!r}", reason="bad_trainer_spec")
    spec = spec.strip()
    if ":" not in spec:
        # Imported lazily: the built-in tasks pull in torch, which custom trainers may not need.
        from agent.tasks import builtin_task

        try:
            return builtin_task(spec)
        except InvalidInput as exc:
            raise InvalidInput(f"{exc}; a custom trainer is named 'module:object'", reason="bad_trainer_spec") from None

    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise InvalidInput(f"trainer spec {spec!r} is not of the form 'module:object'", reason="bad_trainer_spec")
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise InvalidInput(
            f"trainer module {module_name!r} cannot be imported: {exc}", reason="trainer_module_not_found"
        ) from exc
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise InvalidInput(
                f"trainer module {module_name!r} has no attribute {attr_path!r}", reason="trainer_object_not_found"
            )
        target = getattr(target, part)
    return target


def load_trainer(spec: str, options: Mapping[str, Any] | None = None) -> Trainer:
    """Build the trainer named by ``spec`` (see `trainer_target`) with keyword ``options``.

    A class or factory is called with ``**options``; an object that already has
    ``train`` is used as is (and then ``options`` must be empty).
    """
    options = dict(options or {})
    target = trainer_target(spec)
    spec = spec.strip()
    if ":" not in spec:
        return call_with_options(target, options, what=f"task {spec!r}")
    if inspect.isclass(target) or not callable(getattr(target, "train", None)):
        if not callable(target):
            raise InvalidInput(f"{spec!r} has no train() method and is not callable", reason="trainer_without_train")
        trainer = call_with_options(target, options, what=spec)
    elif options:
        raise InvalidInput(
            f"{spec!r} is a ready trainer instance; options {sorted(options)} cannot be applied",
            reason="bad_trainer_options",
        )
    else:
        trainer = target
    if not callable(getattr(trainer, "train", None)):
        raise InvalidInput(f"{spec!r} produced {type(trainer).__name__}, which has no train() method",
                           reason="trainer_without_train")
    return trainer
