"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.harness import FIXTURE_DIR as MNIST_SMALL
from tests.harness import SHIPPED_MODEL

# --- training fixtures ---


@pytest.fixture(scope="session")
def mnist_small_dir() -> Path:
    """The committed real-digit fixture: train-* (500 digits) and t10k-* (300 held-out digits)."""
    return MNIST_SMALL


@pytest.fixture(scope="session")
def shipped_model() -> Path:
    """models/lenet5.onnx, the model this repository ships."""
    if not SHIPPED_MODEL.is_file():
        pytest.fail(f"{SHIPPED_MODEL} is missing: it is committed with the repository")
    return SHIPPED_MODEL


@pytest.fixture(scope="session")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A 20-epoch run on the fixture's 400 training digits (1-2 s), shared by the training/export tests.

    Without augmentation and at a constant learning rate: the quickest way to clearly beat chance.
    """
    pytest.importorskip("torch")
    from training.train import TrainConfig, train

    config = TrainConfig(
        data_dir=MNIST_SMALL,
        out_dir=tmp_path_factory.mktemp("short-run"),
        epochs=20,
        seed=3,
        augment=False,
        lr_schedule="constant",
        val_size=100,
        progress=False,
        command="digits train (test run)",
        threads=1,  # the CPUs are shared with the other tests: more threads only fight over them
    )
    return train(config, log=lambda _: None)


@pytest.fixture(scope="session")
def exported_model(short_run: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The short run's best checkpoint exported to ONNX (one export for all tests: it takes seconds)."""
    from training.export import export_checkpoint

    out = tmp_path_factory.mktemp("export") / "model.onnx"
    return export_checkpoint(short_run.best_checkpoint, out, version="0.0.1-test", command="pytest")


# --- end of training fixtures ---
