"""The ``digits`` task: scikit-learn's bundled 8x8 handwritten digits and a small MLP.

1797 images ship inside scikit-learn (no download). Pixels are scaled from 0..16 to [0, 1].
A fixed stratified 80/20 split (seed 0) gives 1437 training images, which clients
partition among themselves, and 360 test images that no client trains on.
The model is an MLP 64 -> 128 (ReLU) -> 10 with tensors ``fc1.*`` and ``head.*``; it standardizes
its [0, 1] pixel input with fixed dataset constants (as MNIST models do with 0.1307/0.3081), so
callers keep passing plain pixels.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from agent.tasks._torch import Dataset, TorchTask
from proto.errors import InvalidInput

_PIXELS = 64
_CLASSES = 10
_HIDDEN = 128
# Mean and standard deviation of the training pixels (scaled to [0, 1]): fixed constants, not
# tensors, so they never travel or get averaged. Centred inputs let SGD take larger steps.
_PIXEL_MEAN = 0.305
_PIXEL_STD = 0.376


class DigitsMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(_PIXELS, _HIDDEN)
        self.head = nn.Linear(_HIDDEN, _CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc1((x - _PIXEL_MEAN) / _PIXEL_STD)))


@functools.cache
def load_digits_dataset() -> Dataset:
    """The digits data, loaded once per process; arrays are read-only and shared."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    arrays = [np.ascontiguousarray(a) for a in (train_x, train_y, test_x, test_y)]
    for a in arrays:
        a.setflags(write=False)
    return Dataset(train_x=arrays[0], train_y=arrays[1], test_x=arrays[2], test_y=arrays[3])


class DigitsTask(TorchTask):
    """Federated training on a partition of the digits training split."""

    name = "digits"
    # Two epochs cost ~10 ms on a few hundred samples and make non-IID FedAvg climb faster.
    default_epochs = 2
    default_batch_size = 32
    default_lr = 0.05

    @classmethod
    def _dataset(cls) -> Dataset:
        return load_digits_dataset()

    @classmethod
    def _build_model(cls) -> nn.Module:
        return DigitsMLP()

    @classmethod
    def _to_input(cls, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(rows, dtype=np.float32, copy=True))

    @classmethod
    def _user_input(cls, inputs: np.ndarray) -> torch.Tensor:
        """Accepts (N, 64) or (N, 8, 8) pixels scaled to [0, 1], like the training data."""
        if inputs.ndim < 1 or inputs.size != inputs.shape[0] * _PIXELS:
            raise InvalidInput(f"digits: inputs must be (N, 64) or (N, 8, 8), got {inputs.shape}",
                               reason="bad_inputs")
        return cls._to_input(inputs.reshape(inputs.shape[0], _PIXELS))


def evaluate_global(weights: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Loss and accuracy of ``weights`` on the digits global test split."""
    return DigitsTask.evaluate_global(weights)


def test_set() -> tuple[np.ndarray, np.ndarray]:
    """The digits global test split: (float32 [N, 64] in [0, 1], int64 labels)."""
    return DigitsTask.test_set()
