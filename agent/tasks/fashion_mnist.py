"""The ``fashion_mnist`` task: Zalando's Fashion-MNIST with the ``mnist`` task's CNN.

The data is Debian's ``dataset-fashion-mnist`` package (``apt-get install
dataset-fashion-mnist``; ``.ci/run`` installs it), whose four gzipped IDX files live in
``/usr/share/datasets/fashion-mnist``; ``$STRATA_FASHION_MNIST_DIR`` points elsewhere.
Nothing is downloaded at run time. It keeps the standard 60k train / 10k test split, as
``mnist`` does.

The model, its tensor names and its input handling are exactly ``mnist``'s (``MnistCNN``:
``conv1``, ``conv2``, ``fc1``, ``head``), so a model trained on MNIST can seed this task
whole, or through its feature layers with ``head`` reset: the FLHub fork experiment.
"""

from __future__ import annotations

import functools
import gzip
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from agent.tasks._torch import Dataset
from agent.tasks.mnist import MnistTask
from proto.errors import NotFound

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
DIR_ENV = "STRATA_FASHION_MNIST_DIR"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

_SIDE = 28
_FILES = {
    "train_images": ("train-images-idx3-ubyte.gz", 60000),
    "train_labels": ("train-labels-idx1-ubyte.gz", 60000),
    "test_images": ("t10k-images-idx3-ubyte.gz", 10000),
    "test_labels": ("t10k-labels-idx1-ubyte.gz", 10000),
}
_IMAGES_MAGIC = 0x00000803  # IDX: unsigned bytes, 3 dimensions
_LABELS_MAGIC = 0x00000801  # IDX: unsigned bytes, 1 dimension


def dataset_dir() -> Path:
    """Where the IDX files are read from: ``$STRATA_FASHION_MNIST_DIR``, else Debian's path."""
    return Path(os.environ.get(DIR_ENV) or DEFAULT_DIR)


def load_fashion_mnist_dataset() -> Dataset:
    """Fashion-MNIST as uint8 images (N, 28, 28) and int64 labels, loaded once per directory.

    NotFound (reason ``dataset_missing``) names the package to install when a file is absent
    or is not the IDX file it should be.
    """
    return _load(dataset_dir())


@functools.cache
def _load(directory: Path) -> Dataset:
    arrays = {key: _read_idx(directory / filename, count, images=key.endswith("images"))
              for key, (filename, count) in _FILES.items()}
    for a in arrays.values():
        a.setflags(write=False)
    return Dataset(train_x=arrays["train_images"], train_y=arrays["train_labels"],
                   test_x=arrays["test_images"], test_y=arrays["test_labels"])


def _read_idx(path: Path, count: int, *, images: bool) -> np.ndarray:
    if not path.is_file():
        raise NotFound(
            f"fashion_mnist: {path} is missing; install Debian's dataset-fashion-mnist package "
            f"(apt-get install dataset-fashion-mnist) or set {DIR_ENV} to a directory holding its files",
            reason="dataset_missing")
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as exc:
        raise NotFound(f"fashion_mnist: {path} is not a readable gzip file ({exc})", reason="dataset_missing") from exc
    magic, shape = (_IMAGES_MAGIC, (count, _SIDE, _SIDE)) if images else (_LABELS_MAGIC, (count,))
    header = np.frombuffer(raw, dtype=">u4", count=1 + len(shape)) if len(raw) >= 4 * (1 + len(shape)) else None
    expected_len = 4 * (1 + len(shape)) + int(np.prod(shape))
    if header is None or int(header[0]) != magic or tuple(int(d) for d in header[1:]) != shape or len(raw) != expected_len:
        raise NotFound(f"fashion_mnist: {path} is not the IDX file expected (shape {shape})", reason="dataset_missing")
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 * (1 + len(shape))).reshape(shape)
    return data.copy() if images else data.astype(np.int64)


class FashionMnistTask(MnistTask):
    """Federated training on a partition of Fashion-MNIST's 60k training images (``mnist``'s CNN)."""

    name = "fashion_mnist"

    @classmethod
    def _dataset(cls) -> Dataset:
        return load_fashion_mnist_dataset()


def evaluate_global(weights: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Loss and accuracy of ``weights`` on Fashion-MNIST's 10k test images."""
    return FashionMnistTask.evaluate_global(weights)


def test_set() -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's test split: (uint8 [10000, 28, 28], int64 labels)."""
    return FashionMnistTask.test_set()
