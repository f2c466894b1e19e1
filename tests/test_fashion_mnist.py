"""The ``fashion_mnist`` built-in task: Debian's dataset files, mnist's CNN, a clear error when missing."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.tasks import BUILTIN_TASKS, FashionMnistTask, MnistTask, make_task
from agent.tasks.fashion_mnist import DEFAULT_DIR, DIR_ENV, load_fashion_mnist_dataset
from proto.errors import NotFound

_INSTALLED = (Path(DEFAULT_DIR) / "train-images-idx3-ubyte.gz").is_file()
needs_package = pytest.mark.skipif(not _INSTALLED, reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")


def test_fashion_mnist_is_a_builtin_task_with_mnists_tensors() -> None:
    assert BUILTIN_TASKS["fashion_mnist"] is FashionMnistTask
    # same names, shapes and dtypes: a fork copies mnist's feature layers and resets `head`
    ours, theirs = FashionMnistTask.seeded_weights(0), MnistTask.seeded_weights(0)
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    assert {"conv1.weight", "conv2.weight", "fc1.weight", "head.weight", "head.bias"} <= set(ours)


def test_missing_dataset_is_a_clear_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DIR_ENV, str(tmp_path))
    with pytest.raises(NotFound) as info:
        load_fashion_mnist_dataset()
    assert info.value.reason == "dataset_missing"
    assert "dataset-fashion-mnist" in str(info.value) and DIR_ENV in str(info.value)


def test_a_truncated_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 20))
    monkeypatch.setenv(DIR_ENV, str(tmp_path))
    with pytest.raises(NotFound) as info:
        load_fashion_mnist_dataset()
    assert info.value.reason == "dataset_missing" and "not the IDX file" in str(info.value)


@pytest.mark.slow  # a CLI process that imports torch
def test_agent_without_the_dataset_exits_with_one_line(tmp_path: Path) -> None:
    # The daemon's own error path: one line naming the package, no traceback.
    result = subprocess.run(
        [sys.executable, "-m", "strata", "agent", "run", "--set", "task=fashion_mnist",
         "--set", f"state_dir={tmp_path / 'agent'}", "--set", "seeds=127.0.0.1:1", "--set", "join_timeout_s=1"],
        env={**_env(), DIR_ENV: str(tmp_path / "nowhere")}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "dataset-fashion-mnist" in result.stderr
    assert "Traceback" not in result.stderr


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}


@needs_package
@pytest.mark.slow
def test_fashion_mnist_dataset_has_70000_images() -> None:
    train_x = FashionMnistTask._dataset().train_x
    test_x, test_y = FashionMnistTask.test_set()
    assert train_x.shape == (60000, 28, 28) and test_x.shape == (10000, 28, 28)
    assert train_x.dtype == np.uint8 and test_y.dtype == np.int64
    assert np.array_equal(np.unique(test_y), np.arange(10))
    # not MNIST under another name
    assert not np.array_equal(test_x[:8], MnistTask.test_set()[0][:8]) if _mnist_available() else True


@needs_package
@pytest.mark.slow
def test_fashion_mnist_quick_train_step() -> None:
    task = make_task("fashion_mnist", partition={"index": 1, "count": 10}, max_samples=128, max_batches=2)
    start = task.initial_weights()
    new, n, metrics = task.train(start, {"round": "0"})
    assert n == 128 and metrics["batches"] == 2.0
    assert all(new[k].shape == start[k].shape and new[k].dtype == np.float32 for k in start)
    test_x, _ = FashionMnistTask.test_set()
    assert FashionMnistTask.predict(new, test_x[:16]).shape == (16,)
    # mnist's weights load as they are: the whole-model fork
    assert set(FashionMnistTask.evaluate_global(MnistTask.seeded_weights(1))) >= {"accuracy", "loss"}


def _mnist_available() -> bool:
    try:
        MnistTask.test_set()
    except NotFound:
        return False
    return True
