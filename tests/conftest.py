"""Shared pytest fixtures, and the rule that nothing skips silently in CI."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import FIXTURE_DIR as MNIST_SMALL
from tests.harness import SHIPPED_MODEL

# CI runs `make test`, which installs every tool the tests use (chromium, promtool and prometheus,
# Fashion-MNIST, atheris, grpcurl, podman): there, a skip means a promise went untested, so it fails.
IN_CI = os.environ.get("CI", "").lower() == "true"


def _fail_skip(report: Any, what: str) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"{what} skipped under CI=true, where nothing may skip: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        _fail_skip(report, item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if IN_CI and report.skipped:
        _fail_skip(report, collector.nodeid)

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


# --- figures measured by the tests, printed at the end of the run -----------------------------------

MEASURED = pytest.StashKey[list[str]]()


@pytest.fixture(scope="session")
def measured(request: pytest.FixtureRequest) -> Any:
    """`measured("image: 420 MB")`: a line for the end-of-run summary (image sizes, build and drain times)."""
    lines = request.config.stash.setdefault(MEASURED, [])
    return lines.append


def pytest_terminal_summary(terminalreporter: Any) -> None:
    lines = terminalreporter.config.stash.get(MEASURED, [])
    if lines:
        terminalreporter.write_sep("-", "measured")
        for line in lines:
            terminalreporter.write_line(line)
