"""`digits predict` on many files, as a user runs it on a folder: 600 real digit images against a server whose
per-request limit is far below that, one file that cannot be read and one that is not an image. Every
readable image is answered, in file order, in both output formats; the two bad files are named; exit 1."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import ServerThread, fixture_digits, render

FILES = 600


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(max_images_per_request=64) as running:
        yield running


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[int]]:
    """600 PNGs of real fixture digits (each used twice, at two sizes), named in order, with two bad files
    among them: a dangling symlink (cannot be read) and a text file (not an image)."""
    images, labels = fixture_digits()
    root = tmp_path_factory.mktemp("scans")
    paths, truth = [], []
    for i in range(FILES):
        path = root / f"scan-{i:04d}.png"
        if i == 123:
            path.symlink_to(root / "gone.png")
            truth.append(-1)
        elif i == 456:
            path.write_text("not an image\n")
            truth.append(-1)
        else:
            digit = i % len(images)
            size = 40 if i < len(images) else 90
            path.write_bytes(render(images[digit], size, (size + 30, size + 20), (12, 9)))
            truth.append(int(labels[digit]))
        paths.append(path)
    return paths, truth


def predict(server: ServerThread, files: list[Path], *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", "predict", "--server", server.target, *flags,
                           *map(str, files)], capture_output=True, text=True, timeout=240)


def test_text_output_answers_every_readable_file_in_order(server, folder) -> None:
    paths, truth = folder
    done = predict(server, paths)
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    good = [(p, t) for p, t in zip(paths, truth, strict=True) if t >= 0]
    assert [line.split("\t")[0] for line in lines] == [str(p) for p, _ in good]
    assert all(len(line.split("\t")) == 4 for line in lines)
    right = sum(line.split("\t")[1] == str(t) for line, (_, t) in zip(lines, good, strict=True))
    assert right >= 0.97 * len(good), f"{right}/{len(good)}"
    errors = done.stderr.splitlines()
    assert len(errors) == 2
    assert str(paths[123]) in errors[0] and "LOCAL" in errors[0] and "cannot read" in errors[0]
    assert str(paths[456]) in errors[1] and "INVALID_ARGUMENT" in errors[1] and "cannot decode" in errors[1]


def test_json_output_keeps_file_order_and_names_the_failures(server, folder) -> None:
    paths, truth = folder
    done = predict(server, paths, "--json", "--batch", "50", "--in-flight", "3")
    assert done.returncode == 1
    rows = json.loads(done.stdout)
    assert [row["file"] for row in rows] == [str(p) for p in paths]
    for row, label in zip(rows, truth, strict=True):
        if label < 0:
            assert set(row) == {"file", "error"} and row["error"]["code"] in ("LOCAL", "INVALID_ARGUMENT")
        else:
            assert {"digit", "confidence", "probabilities", "accepted", "rejection", "model",
                    "model_version"} <= set(row)
            assert row["accepted"] is (row["rejection"] is None)
    answered = [row for row in rows if "digit" in row]
    assert len(answered) == FILES - 2
    assert sum(r["digit"] == t for r, t in zip(answered, [t for t in truth if t >= 0], strict=True)) \
        >= 0.97 * len(answered)


def test_all_good_files_exit_zero(server, folder) -> None:
    paths, _ = folder
    done = predict(server, paths[:100])
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 100 and done.stderr == ""
