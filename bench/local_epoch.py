"""Local epoch time: DigitsTask.train against a bare torch loop over the same samples.

Run alone: `python bench/local_epoch.py [--repeats N]`. It times one epoch of the
`digits` task with max_samples 300 (10 optimizer steps of 32), the best of N runs
after a warm-up, and, in the same run, the baseline: the same MLP, optimizer, batch
size and samples in a plain loop with no Trainer around it. It prints both and the
ratio task / baseline. The ratio is the overhead of the task's machinery (loading
weights into the model, exporting them, metrics); the absolute time is what an agent
with 300 samples spends training per round. Targets: ratio at most 3, and an epoch
under 0.5 s, the bound tests/test_tasks.py used to assert before timing left the tests.
"""

from __future__ import annotations

import argparse

import _common
import numpy as np
import torch
from torch import nn

from agent.tasks.digits import DigitsMLP, DigitsTask, load_digits_dataset

MAX_SAMPLES = 300
TARGET_RATIO = 3.0
TARGET_EPOCH_S = 0.5


def baseline_epoch(indices: np.ndarray, weights: dict[str, np.ndarray], batch_size: int, lr: float) -> None:
    data = load_digits_dataset()
    model = DigitsMLP()
    model.load_state_dict({name: torch.from_numpy(array.copy()) for name, array in weights.items()})
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    order = np.random.default_rng(0).permutation(indices)
    for start in range(0, order.shape[0], batch_size):
        batch = order[start : start + batch_size]
        x = torch.from_numpy(np.array(data.train_x[batch], dtype=np.float32))
        y = torch.from_numpy(data.train_y[batch].astype(np.int64))
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    task = DigitsTask(partition={"count": 1}, max_samples=MAX_SAMPLES)
    weights = task.initial_weights()
    config = {"epochs": 1}
    task.train(weights, config)  # warm-up: dataset load, first-call allocations
    baseline_epoch(task.train_indices, weights, DigitsTask.default_batch_size, DigitsTask.default_lr)

    task_s = _common.best_seconds(lambda: task.train(weights, config), args.repeats)
    base_s = _common.best_seconds(
        lambda: baseline_epoch(task.train_indices, weights, DigitsTask.default_batch_size, DigitsTask.default_lr),
        args.repeats,
    )
    ratio = task_s / base_s
    _common.print_table(
        ["samples", "task epoch ms", "bare torch loop ms", "ratio", "target ratio", "met?"],
        [[MAX_SAMPLES, f"{task_s * 1e3:.1f}", f"{base_s * 1e3:.1f}", f"{ratio:.2f}", f"<= {TARGET_RATIO:g}",
          "yes" if ratio <= TARGET_RATIO else "OVER"]],
    )
    verdict = "meets" if task_s < TARGET_EPOCH_S else "MISSES"
    print(f"one epoch of {MAX_SAMPLES} samples: {task_s:.3f} s, {verdict} the {TARGET_EPOCH_S} s target")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
