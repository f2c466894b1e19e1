"""The shared PyTorch machinery of the built-in tasks: options, local data, train and eval loops.

A task subclass supplies only its dataset (``_dataset``), its model (``_build_model``) and
how stored rows become model input (``_to_input`` / ``_user_input``). Weights enter and
leave as ``dict[str, np.ndarray]`` float32; torch objects never cross the task boundary.

Threads: torch's intra-op thread count is process-wide. A task sets it once on construction
to ``torch_threads`` (default 1), because the demos run many agents in one process and one
thread each avoids oversubscribing the CPU; pass ``torch_threads=None`` to leave torch alone.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from agent.algorithms import (
    SCAFFOLD_LR,
    SCAFFOLD_STEPS,
    momentum_step_size,
    prox_mu,
    scaffold_correction,
)
from agent.tasks.partition import partition_indices
from proto.errors import InvalidInput

Weights = dict[str, np.ndarray]

HEAD_PREFIX = "head."
_EVAL_BATCH = 1024
_PARTITION_KEYS = frozenset(
    {"scheme", "alpha", "index", "count", "seed", "shards_per_client", "groups", "group", "group_alpha"}
)
# Seeding the global torch RNG to build initial weights must not interleave across threads.
_INIT_LOCK = threading.Lock()


@dataclass(frozen=True, kw_only=True)
class Dataset:
    """A task's data as stored in memory (shared, read-only): rows in their compact form."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    epochs: int
    batch_size: int
    lr: float
    lr_decay: float  # the learning rate of round r is lr * lr_decay**r
    momentum: float
    max_batches: int | None

    def round_lr(self, round_number: int) -> float:
        return self.lr * self.lr_decay**round_number


class TorchTask:
    """A classifier trained with SGD (momentum) or Adam on one client's partition.

    With ``prox_mu`` > 0 in the round config (FedProx), every step follows the gradient of
    ``loss + prox_mu / 2 * ||w - w_base||^2`` over the trained tensors. With SCAFFOLD, every
    step adds the agent's correction ``c - c_i`` to the gradient, and the metrics report the
    K steps taken and their effective step size (momentum included) for the variate update.
    """

    name: ClassVar[str] = ""
    round_algorithms: ClassVar[frozenset[str]] = frozenset({"fedprox", "scaffold"})
    default_epochs: ClassVar[int] = 1
    default_batch_size: ClassVar[int] = 32
    default_lr: ClassVar[float] = 0.05

    def __init__(
        self,
        *,
        partition: Mapping[str, Any] | None = None,
        seed: int = 0,
        head_only: bool = False,
        max_samples: int | None = None,
        epochs: int | None = None,
        batch_size: int | None = None,
        lr: float | None = None,
        lr_decay: float = 1.0,
        momentum: float = 0.9,
        optimizer: str = "sgd",
        max_batches: int | None = None,
        holdout: float = 0.2,
        torch_threads: int | None = 1,
        label_flip: bool = False,
    ) -> None:
        threads = as_optional_int(torch_threads, "torch_threads", minimum=1)
        if threads is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        self.seed = as_int(seed, "seed", minimum=0)
        self.head_only = as_bool(head_only, "head_only")
        # a poisoning device (the simulator's label_flip attack): trains on label c as (classes - 1 - c)
        self.label_flip = as_bool(label_flip, "label_flip")
        self.optimizer = str(optimizer).lower()
        if self.optimizer not in ("sgd", "adam"):
            raise InvalidInput(f"{self.name}: optimizer must be 'sgd' or 'adam', got {optimizer!r}",
                               reason="bad_task_option")
        self.defaults = TrainSettings(
            epochs=as_int(self.default_epochs if epochs is None else epochs, "epochs", minimum=1),
            batch_size=as_int(self.default_batch_size if batch_size is None else batch_size, "batch_size", minimum=1),
            lr=as_float(self.default_lr if lr is None else lr, "lr", positive=True),
            lr_decay=_as_decay(lr_decay),
            momentum=as_float(momentum, "momentum"),
            max_batches=as_optional_int(max_batches, "max_batches", minimum=1),
        )
        self.partition = _partition_options(partition)
        holdout_fraction = as_float(holdout, "holdout")
        if not 0.0 < holdout_fraction < 1.0:
            raise InvalidInput(f"{self.name}: holdout must be in (0, 1)", reason="bad_task_option")

        data = self._dataset()
        local = partition_indices(data.train_y, **self.partition)
        if local.shape[0] < 2:
            raise InvalidInput(f"{self.name}: partition {self.partition} holds {local.shape[0]} samples; need >= 2",
                               reason="partition_too_small")
        # The split depends only on the partition, so every run of this client sees the same one.
        split_rng = np.random.default_rng(
            [self.partition["seed"], 7, self.partition.get("group") or 0, self.partition["index"]]
        )
        local = split_rng.permutation(local)
        n_holdout = min(max(1, round(holdout_fraction * local.shape[0])), local.shape[0] - 1)
        self.eval_indices = np.sort(local[:n_holdout])
        train_indices = local[n_holdout:]
        cap = as_optional_int(max_samples, "max_samples", minimum=1)
        if cap is not None:
            train_indices = train_indices[:cap]
        self.train_indices = np.sort(train_indices)
        self._num_classes = int(data.train_y.max()) + 1
        self._model = self._build_model()
        self._tensor_names = tuple(self._model.state_dict())
        self._train_calls = 0

    @classmethod
    def pooled(cls, tasks: Sequence[TorchTask]) -> TorchTask:
        """One task holding the union of ``tasks``' training and held-out samples: the
        centralized reference a federation is measured against. It trains with the first
        task's settings and seed; the given tasks are left untouched."""
        if not tasks or any(type(t) is not cls for t in tasks):
            raise InvalidInput(f"{cls.name}: pooled() needs one or more {cls.__name__} tasks", reason="bad_task_option")
        union = copy.copy(tasks[0])
        union.train_indices = np.unique(np.concatenate([t.train_indices for t in tasks]))
        union.eval_indices = np.unique(np.concatenate([t.eval_indices for t in tasks]))
        union.head_only = False
        union._model = cls._build_model()
        union._train_calls = 0
        return union

    # --- what a subclass provides -------------------------------------------------------

    @classmethod
    def _dataset(cls) -> Dataset:
        raise NotImplementedError

    @classmethod
    def _build_model(cls) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def _to_input(cls, rows: np.ndarray) -> torch.Tensor:
        """Stored rows (as in ``Dataset``) to a float32 model input batch."""
        raise NotImplementedError

    @classmethod
    def _user_input(cls, inputs: np.ndarray) -> torch.Tensor:
        """Caller-supplied inputs of ``predict`` to a float32 model input batch."""
        raise NotImplementedError

    # --- the Trainer surface --------------------------------------------------------------

    @property
    def num_train_samples(self) -> int:
        return int(self.train_indices.shape[0])

    def initial_weights(self) -> Weights:
        """The base model: a deterministic initialization for this task's ``seed``."""
        return self.seeded_weights(self.seed)

    @classmethod
    def seeded_weights(cls, seed: int = 0) -> Weights:
        """A deterministic initialization for ``seed``, without loading any data."""
        with _INIT_LOCK, torch.random.fork_rng(devices=[]):
            torch.manual_seed(as_int(seed, "seed", minimum=0))
            model = cls._build_model()
        return _export(model)

    def trainable_tensors(self) -> list[str] | None:
        if not self.head_only:
            return None
        return [name for name in self._tensor_names if name.startswith(HEAD_PREFIX)]

    def train(self, weights: Mapping[str, np.ndarray], round_config: Mapping[str, Any] | None = None
              ) -> tuple[Weights, int, dict[str, float]]:
        settings = self._settings(round_config or {})
        self._load(self._model, weights)
        round_key = (round_config or {}).get("round")
        if round_key is None:
            round_key = self._train_calls
        self._train_calls += 1
        round_number = as_int(round_key, "round", minimum=0)
        rng = np.random.default_rng(
            [self.seed, 11, self.partition.get("group") or 0, self.partition["index"], round_number]
        )
        frozen = set()
        if self.head_only:
            frozen = {name for name in self._tensor_names if not name.startswith(HEAD_PREFIX)}
        named_params = [(name, p) for name, p in self._model.named_parameters() if name not in frozen]
        params = [p for _, p in named_params]
        for name, p in self._model.named_parameters():
            p.requires_grad_(name not in frozen)
        correction = scaffold_correction(round_config or {})
        if correction is not None and self.optimizer != "sgd":
            raise InvalidInput(f"{self.name}: SCAFFOLD's variate update assumes SGD steps; optimizer is "
                               f"{self.optimizer!r}", reason="bad_task_option")
        corrections = self._corrections(named_params, correction) if correction is not None else None
        opt: _Optimizer
        if self.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=settings.round_lr(round_number))
        else:
            opt = MomentumSGD(params, lr=settings.round_lr(round_number), momentum=settings.momentum)

        mu = prox_mu(round_config or {})
        # FedProx's anchor: the base weights, as loaded, of the tensors this round trains
        anchor = [p.detach().clone() for p in params] if mu > 0 else None
        metrics = self._train_loop(opt, settings, rng, proximal=(params, anchor, mu) if anchor else None,
                                   corrected=(params, corrections) if corrections is not None else None)
        if mu > 0:
            metrics["prox_mu"] = mu  # in the update's manifest: which objective it followed
        if corrections is not None:
            steps = int(metrics["batches"])
            metrics[SCAFFOLD_STEPS] = float(steps)
            metrics[SCAFFOLD_LR] = momentum_step_size(settings.round_lr(round_number), settings.momentum, steps)
        updated = _export(self._model)
        # Frozen tensors go back exactly as they came in, bit for bit.
        for name in frozen:
            updated[name] = np.array(weights[name], dtype=np.float32, copy=True)
        return updated, self.num_train_samples, metrics

    def evaluate(self, weights: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Loss and accuracy on this client's held-out slice of its partition."""
        self._load(self._model, weights)
        data = self._dataset()
        metrics = _evaluate(self._model, self._to_input, data.train_x, data.train_y, self.eval_indices)
        return {**metrics, "num_samples": float(self.eval_indices.shape[0])}

    @classmethod
    def test_set(cls) -> tuple[np.ndarray, np.ndarray]:
        """The global held-out test split (stored rows, labels) that no client trains on."""
        data = cls._dataset()
        return data.test_x, data.test_y

    @classmethod
    def evaluate_global(cls, weights: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Loss and accuracy on the global test split."""
        model = cls._build_model()
        cls._load(model, weights)
        data = cls._dataset()
        return _evaluate(model, cls._to_input, data.test_x, data.test_y, np.arange(data.test_y.shape[0]))

    @classmethod
    def predict(cls, weights: Mapping[str, np.ndarray], inputs: np.ndarray) -> np.ndarray:
        """Predicted class (int64) for each input row; needs no local data."""
        model = cls._build_model()
        cls._load(model, weights)
        x = cls._user_input(np.asarray(inputs))
        model.eval()
        with torch.inference_mode():
            out = torch.cat([model(chunk).argmax(dim=1) for chunk in x.split(_EVAL_BATCH)]) if len(x) else \
                torch.empty(0, dtype=torch.int64)
        return out.numpy().astype(np.int64)

    # --- internals --------------------------------------------------------------------------

    def _settings(self, round_config: Mapping[str, Any]) -> TrainSettings:
        d = self.defaults
        return TrainSettings(
            epochs=as_int(round_config.get("epochs", d.epochs), "epochs", minimum=1),
            batch_size=as_int(round_config.get("batch_size", d.batch_size), "batch_size", minimum=1),
            lr=as_float(round_config.get("lr", d.lr), "lr", positive=True),
            lr_decay=_as_decay(round_config.get("lr_decay", d.lr_decay)),
            momentum=as_float(round_config.get("momentum", d.momentum), "momentum"),
            max_batches=as_optional_int(round_config.get("max_batches", d.max_batches), "max_batches", minimum=1),
        )

    def _corrections(self, named_params: Sequence[tuple[str, torch.Tensor]], correction: Mapping[str, np.ndarray]
                     ) -> list[torch.Tensor]:
        """SCAFFOLD's c - c_i as tensors aligned with the trained parameters; checked, since the agent
        built it from what its home served."""
        out = []
        for name, p in named_params:
            value = correction.get(name)
            if value is None or tuple(value.shape) != tuple(p.shape) or not np.all(np.isfinite(value)):
                raise InvalidInput(f"{self.name}: SCAFFOLD correction for {name!r} is missing, mis-shaped or "
                                   f"non-finite", reason="bad_round_config")
            out.append(torch.from_numpy(np.array(value, dtype=np.float32, copy=True)))
        return out

    def _train_loop(self, opt: _Optimizer, settings: TrainSettings, rng: np.random.Generator,
                    proximal: tuple[list[torch.Tensor], list[torch.Tensor], float] | None = None,
                    corrected: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
                    ) -> dict[str, float]:
        data = self._dataset()
        model = self._model
        model.train()
        loss_fn = nn.CrossEntropyLoss(reduction="sum")
        # running sums stay tensors: reading them back every step would cost more than the step
        total_loss = torch.zeros((), dtype=torch.float64)
        correct = torch.zeros((), dtype=torch.int64)
        seen = 0
        batches = 0
        budget = settings.max_batches
        for _ in range(settings.epochs):
            order = rng.permutation(self.train_indices)
            for start in range(0, order.shape[0], settings.batch_size):
                if budget is not None and batches >= budget:
                    break
                idx = order[start:start + settings.batch_size]
                x = self._to_input(data.train_x[idx])
                y = torch.from_numpy(data.train_y[idx].astype(np.int64))
                if self.label_flip:
                    y = self._num_classes - 1 - y
                opt.zero_grad(set_to_none=True)
                logits = model(x)
                loss_sum = loss_fn(logits, y)
                (loss_sum / y.shape[0]).backward()
                if proximal is not None:
                    add_proximal_gradient(*proximal)
                if corrected is not None:
                    add_control_correction(*corrected)
                opt.step()
                with torch.no_grad():
                    total_loss += loss_sum
                    correct += (logits.argmax(dim=1) == y).sum()
                seen += int(y.shape[0])
                batches += 1
        return {
            "loss": float(total_loss) / max(seen, 1),
            "accuracy": int(correct) / max(seen, 1),
            "batches": float(batches),
        }

    @classmethod
    def _load(cls, model: nn.Module, weights: Mapping[str, np.ndarray]) -> None:
        expected = model.state_dict()
        if set(weights) != set(expected):
            missing = sorted(set(expected) - set(weights))
            extra = sorted(set(weights) - set(expected))
            raise InvalidInput(f"{cls.name}: weights do not match the model (missing {missing}, unexpected {extra})",
                               reason="weights_mismatch")
        tensors = {}
        for name, ref in expected.items():
            arr = np.asarray(weights[name])
            if tuple(arr.shape) != tuple(ref.shape) or not np.issubdtype(arr.dtype, np.floating):
                raise InvalidInput(
                    f"{cls.name}: tensor {name!r} is {arr.dtype}{list(arr.shape)}, expected float{list(ref.shape)}",
                    reason="weights_mismatch",
                )
            if not np.all(np.isfinite(arr)):
                raise InvalidInput(f"{cls.name}: tensor {name!r} has non-finite values", reason="non_finite_weights")
            # A private copy: incoming arrays may be read-only views of a safetensors buffer.
            tensors[name] = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))
        model.load_state_dict(tensors, strict=True)


@torch.no_grad()
def add_proximal_gradient(params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor], mu: float) -> None:
    """FedProx: add ``mu * (p - anchor)``, the gradient of ``mu / 2 * ||p - anchor||^2``, to each ``p.grad``."""
    for p, a in zip(params, anchor, strict=True):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.add_(p - a, alpha=mu)


@torch.no_grad()
def add_control_correction(params: Sequence[torch.Tensor], corrections: Sequence[torch.Tensor]) -> None:
    """SCAFFOLD: add ``c - c_i`` to each ``p.grad`` (the local step follows g(y) - c_i + c)."""
    for p, correction in zip(params, corrections, strict=True):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.add_(correction)


class _Optimizer(Protocol):
    def zero_grad(self, set_to_none: bool = ...) -> None: ...

    def step(self) -> Any: ...


class MomentumSGD:
    """SGD with heavy-ball momentum, exactly as ``torch.optim.SGD`` computes it without dampening
    or Nesterov: buf = momentum * buf + grad (buf = grad on the first step); p -= lr * buf.

    Written out because torch.optim's first use in a process imports torch._dynamo (and sympy
    with it): seconds per agent process, more than a whole demo round of training. One fused
    update over all tensors also beats the per-tensor default on models this small."""

    def __init__(self, params: Sequence[torch.Tensor], *, lr: float, momentum: float = 0.0) -> None:
        self.params = list(params)
        self.lr = lr
        self.momentum = momentum
        self._buffers: list[torch.Tensor] | None = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        params = self.params
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        if self.momentum:
            if self._buffers is None:
                self._buffers = [g.detach().clone() for g in grads]
            else:
                torch._foreach_mul_(self._buffers, self.momentum)
                torch._foreach_add_(self._buffers, grads)
            grads = self._buffers
        torch._foreach_add_(params, grads, alpha=-self.lr)


def _export(model: nn.Module) -> Weights:
    return {name: t.detach().cpu().numpy().astype(np.float32, copy=True) for name, t in model.state_dict().items()}


def _evaluate(model: nn.Module, to_input: Any, xs: np.ndarray, ys: np.ndarray, indices: np.ndarray
              ) -> dict[str, float]:
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss = 0.0
    correct = 0
    with torch.inference_mode():
        for start in range(0, indices.shape[0], _EVAL_BATCH):
            idx = indices[start:start + _EVAL_BATCH]
            logits = model(to_input(xs[idx]))
            y = torch.from_numpy(ys[idx].astype(np.int64))
            total_loss += float(loss_fn(logits, y))
            correct += int((logits.argmax(dim=1) == y).sum())
    n = max(int(indices.shape[0]), 1)
    return {"loss": total_loss / n, "accuracy": correct / n}


def _partition_options(partition: Mapping[str, Any] | None) -> dict[str, Any]:
    given = dict(partition or {})
    unknown = set(given) - _PARTITION_KEYS
    if unknown:
        raise InvalidInput(f"unknown partition options {sorted(unknown)}; known: {sorted(_PARTITION_KEYS)}",
                           reason="bad_task_option")
    # The partition seed is deliberately separate from the task seed: every client of a
    # federation must share it (or the slices overlap), while task seeds may differ.
    options: dict[str, Any] = {
        "scheme": str(given.get("scheme", "dirichlet")),
        "alpha": as_float(given.get("alpha", 0.5), "partition.alpha", positive=True),
        "index": as_int(given.get("index", 0), "partition.index", minimum=0),
        "count": as_int(given.get("count", 1), "partition.count", minimum=1),
        "seed": as_int(given.get("seed", 0), "partition.seed", minimum=0),
        "shards_per_client": as_int(given.get("shards_per_client", 2), "partition.shards_per_client", minimum=1),
    }
    if given.get("groups") is not None:
        options["groups"] = as_int(given["groups"], "partition.groups", minimum=1)
        options["group"] = as_int(given.get("group", 0), "partition.group", minimum=0)
        if given.get("group_alpha") is not None:
            options["group_alpha"] = as_float(given["group_alpha"], "partition.group_alpha", positive=True)
    return options


# --- coercion of option values that may arrive as strings (YAML, env, round_config) -------


def as_int(value: Any, name: str, *, minimum: int | None = None) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, float | np.floating):
            if not float(value).is_integer():
                raise ValueError
            result = int(value)
        else:
            result = int(str(value).strip(), 10) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{name} must be an integer, got {value!r}", reason="bad_task_option") from None
    if minimum is not None and result < minimum:
        raise InvalidInput(f"{name} must be >= {minimum}, got {result}", reason="bad_task_option")
    return result


def as_optional_int(value: Any, name: str, *, minimum: int | None = None) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    return as_int(value, name, minimum=minimum)


def as_float(value: Any, name: str, *, positive: bool = False) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        result = float(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{name} must be a number, got {value!r}", reason="bad_task_option") from None
    if not np.isfinite(result) or (positive and result <= 0):
        raise InvalidInput(f"{name} must be a finite{' positive' if positive else ''} number, got {value!r}",
                           reason="bad_task_option")
    return result


def _as_decay(value: Any) -> float:
    decay = as_float(value, "lr_decay", positive=True)
    if decay > 1.0:
        raise InvalidInput(f"lr_decay must be in (0, 1], got {value!r}", reason="bad_task_option")
    return decay


def as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return value.strip().lower() in ("true", "1", "yes", "on")
    raise InvalidInput(f"{name} must be a boolean, got {value!r}", reason="bad_task_option")
