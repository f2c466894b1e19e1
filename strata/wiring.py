"""Wiring that crosses package boundaries: only `strata/` may import both the agent's tasks and the aggregator."""

from __future__ import annotations

from typing import Any

from aggregator.config import AggregatorConfig
from aggregator.daemon import InitialModelFactory
from aggregator.evaluation import Evaluate
from proto.errors import ConfigError, InvalidInput
from storage.codec import encode_tensors
from storage.keys import KeyPair
from storage.manifest import Producer
from storage.models import save_model
from storage.store import ContentStore


def task_base_model(store: ContentStore, key: KeyPair, *, task: str, federation: str, seed: int = 0) -> str:
    """Store a built-in task's seeded initial weights as a round-0 base model; returns its model ID.

    The weights are deterministic for (task, seed), so every aggregator of a fleet
    starts from the same weights CID.
    """
    from agent.tasks import builtin_task

    try:
        task_class = builtin_task(task)
    except InvalidInput as exc:
        raise ConfigError(f"initial_model task:{task}: {exc}") from None
    return seeded_base_model(store, key, task_class=task_class, task=task, federation=federation, seed=seed)


def seeded_base_model(
    store: ContentStore, key: KeyPair, *, task_class: Any, task: str, federation: str, seed: int = 0
) -> str:
    """`task_class.seeded_weights(seed)` stored as a round-0 base model named for `task`; its model ID.
    (task_base_model for the built-ins; a benchmark's own task classes come here directly.)"""
    weights = task_class.seeded_weights(seed)
    manifest = save_model(
        store,
        weights=encode_tensors(weights),
        kind="base",
        federation=federation,
        round=0,
        producer=Producer(role="task", id=f"{task}@seed{seed}"),
        key=key,
        algorithm={"name": "init", "params": {"task": task, "seed": seed}},
    )
    return manifest.cid


def initial_model_factory(config: AggregatorConfig) -> InitialModelFactory | None:
    spec = config.initial_model
    if not spec.startswith("task:"):
        return None
    task = spec.removeprefix("task:")
    return lambda store, key: task_base_model(store, key, task=task, federation=config.federation)


def heldout_evaluator(config: AggregatorConfig) -> Evaluate | None:
    """The `evaluation` key's evaluator: task:NAME evaluates a model on that built-in task's held-out split."""
    if not config.evaluation:
        return None
    from agent.tasks import builtin_task

    task = config.evaluation.removeprefix("task:")
    try:
        return builtin_task(task).evaluate_global
    except InvalidInput as exc:
        raise ConfigError(f"evaluation task:{task}: {exc}") from None
