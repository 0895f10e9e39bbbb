"""The training subcommands through the real `digits` entry point, and `digits download`."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from training.download import DownloadError, download_mnist

REPO = Path(__file__).resolve().parents[2]
# Runs `digits` as installed, with torch made unimportable: what a server install sees.
WITHOUT_TORCH = "import sys; sys.modules['torch'] = None; from service.cli import main; sys.exit(main(sys.argv[1:]))"


def digits(*args: str, env: dict[str, str] | None = None, torch: bool = True) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "service.cli"] if torch else [sys.executable, "-c", WITHOUT_TORCH]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=240,
        check=False,
    )


def assert_clean_error(done: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in done.stderr, done.stderr


# --- evaluate ----------------------------------------------------------------------------------------


def test_evaluate_json_shipped_model(shipped_model: Path, mnist_small_dir: Path) -> None:
    done = digits("evaluate", "--model", str(shipped_model), "--data-dir", str(mnist_small_dir), "--json",
                  "--negatives", "20")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # exactly one JSON object on stdout
    assert report["count"] == 300
    assert report["accuracy"] >= 0.97
    low, high = report["accuracy_wilson95"]
    assert low < report["accuracy"] <= high + 1e-9  # 300/300 correct: the upper bound is 1
    assert 0 <= report["ece"] < 0.05 and report["ece_bins"] == 15 and report["temperature"] > 0
    assert report["rejection_rule"] is True
    assert set(report["rejected_by_reason"]) == {"not_a_digit", "uncertain"}
    assert report["rejected"]["count"] == 300 and report["rejected"]["value"] <= 0.02
    # Rejection takes out mostly errors; one right digit rejected (model 2.1.0 rejects 1 of these 300, a
    # right one) may lower it by at most that digit's worth.
    accepted = report["accuracy_on_accepted"]
    assert accepted["count"] == 300 - report["rejected"]["successes"]
    assert accepted["value"] >= report["accuracy"] - 1 / accepted["count"]
    assert len(report["reliability"]["counts"]) == 15 and sum(report["reliability"]["counts"]) == 300
    negatives = report["negatives"]["synthetic_eval_kinds"]
    assert negatives["count"] == 120 and negatives["rejected"]["value"] >= 0.8
    assert set(negatives["auroc"]) == {"max_probability", "logsumexp", "max_logit"}
    assert report["model_version"] and report["split"] == "test"
    assert len(report["per_class"]) == 10
    assert {"label", "precision", "recall", "f1", "support"} <= set(report["per_class"][0])
    assert sum(c["support"] for c in report["per_class"]) == 300
    matrix = report["confusion_matrix"]
    assert sum(map(sum, matrix)) == 300
    assert sum(matrix[i][i] for i in range(10)) == round(report["accuracy"] * 300)


def test_evaluate_works_without_torch(shipped_model: Path, mnist_small_dir: Path, tmp_path: Path) -> None:
    plot, curve = tmp_path / "cm.png", tmp_path / "coverage.png"
    done = digits(
        "evaluate",
        "--model",
        str(shipped_model),
        "--data-dir",
        str(mnist_small_dir),
        "--split",
        "train",
        "--batch-size",
        "64",
        "--plot",
        str(plot),
        "--client-style",
        "--negatives",
        "5",
        "--curve",
        str(curve),
        torch=False,
    )
    assert done.returncode == 0, done.stderr
    assert "accuracy" in done.stdout and "confusion matrix" in done.stdout
    assert "true\\pred" in done.stdout and "Wilson 95% interval" in done.stdout and "ECE (15 bins)" in done.stdout
    assert "each digit sent as a client would" in done.stdout and "synthetic_eval_kinds" in done.stdout
    assert plot.read_bytes()[:4] == b"\x89PNG" and curve.read_bytes()[:4] == b"\x89PNG"


def test_torch_commands_without_torch_say_how_to_install(tmp_path: Path) -> None:
    for command in (["train", "--data-dir", "x", "--out-dir", str(tmp_path)], ["export", "--checkpoint", "x"]):
        done = digits(*command, torch=False)
        assert done.returncode == 2
        assert_clean_error(done, f"digits {command[0]} needs the training extra: pip install '.[train]'")


def test_parser_imports_nothing_heavy() -> None:
    code = (
        "import sys; from service.cli import build_parser; build_parser(); "
        "heavy = [m for m in ('torch', 'matplotlib', 'onnxruntime') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_missing_data_dir_is_a_clear_error(shipped_model: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    done = digits("evaluate", "--model", str(shipped_model), "--data-dir", str(missing))
    assert_clean_error(done, "digits evaluate: error:", f"{missing}: data directory not found")
    done = digits("train", "--data-dir", str(missing), "--out-dir", str(tmp_path / "run"), "--epochs", "1")
    assert_clean_error(done, "digits train: error:", f"{missing}: data directory not found")


def test_missing_model_and_missing_split(shipped_model: Path, mnist_small_dir: Path, tmp_path: Path) -> None:
    done = digits("evaluate", "--model", str(tmp_path / "none.onnx"), "--data-dir", str(mnist_small_dir))
    assert_clean_error(done, "none.onnx: model file not found")
    (tmp_path / "empty").mkdir()
    done = digits("evaluate", "--model", str(shipped_model), "--data-dir", str(tmp_path / "empty"))
    assert_clean_error(done, "missing t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]")


# --- train + export end to end ---------------------------------------------------------------------


def test_train_export_evaluate_end_to_end(mnist_small_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    run, model = tmp_path / "run", tmp_path / "models" / "m.onnx"
    done = digits(
        "train",
        "--data-dir",
        str(mnist_small_dir),
        "--out-dir",
        str(run),
        "--epochs",
        "2",
        "--val-size",
        "100",
        "--model-out",
        str(model),
        "--version",
        "9.9.9",
        "--threads",
        "1",
    )
    assert done.returncode == 0, done.stderr
    assert "epoch   2/2" in done.stdout and "digits evaluate --model" in done.stdout
    for name in ("best.pt", "last.pt", "metrics.jsonl", "training-curves.png"):
        assert (run / name).is_file(), name
    assert (model.parent / "training-curves.png").is_file() and model.with_suffix(".json").is_file()
    card = json.loads(model.with_suffix(".json").read_text())
    assert card["reproduce"].startswith("digits train --data-dir tests/fixtures/mnist-small")  # relative paths
    assert "--model-out" in card["reproduce"] and card["version"] == "9.9.9"
    assert str(REPO) not in card["metadata"]["training_data"] + card["metadata"]["command"]

    again = tmp_path / "again.onnx"
    done = digits(
        "export", "--checkpoint", str(run / "best.pt"), "--out", str(again), "--data-dir", str(mnist_small_dir)
    )
    assert done.returncode == 0, done.stderr
    assert "max diff" in done.stdout
    assert "&& digits export --checkpoint" in json.loads(again.with_suffix(".json").read_text())["reproduce"]

    done = digits("evaluate", "--model", str(again), "--data-dir", str(mnist_small_dir), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["model_version"] == "1.0.0"


def test_cross_validated_pipeline_end_to_end(mnist_small_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    data = tmp_path / "data"
    from training.data import load_split, write_split

    write_split(data, "train", load_split(mnist_small_dir, "train"))  # no t10k-*: a test part is held out
    run, model = tmp_path / "run", tmp_path / "m.onnx"
    done = digits("train", "--data-dir", str(data), "--out-dir", str(run), "--cv", "2", "--epochs", "1",
                  "--test-size", "100", "--jobs", "2", "--oe-per-digit", "1", "--model-out", str(model),
                  "--version", "0.1.0")
    assert done.returncode == 0, done.stderr
    assert "cross-validated accuracy" in done.stdout and "test: accuracy" in done.stdout
    report = json.loads((run / "report.json").read_text())
    assert len(report["cross_validation"]["folds"]) == 2 and report["data"]["counts"] == {"pool": 400, "test": 100}
    indices = json.loads((run / "heldout" / "indices.json").read_text())
    assert not set(indices["test_indices"]) & set(indices["pool_indices"])
    assert sorted(i for fold in indices["folds"] for i in fold) == indices["pool_indices"]
    assert report["test"]["mnist"]["count"] == 100 and "wilson95" in report["test"]["mnist"]["accuracy"]
    card = json.loads(model.with_suffix(".json").read_text())
    assert card["reproduce"].startswith("digits train --data-dir ") and "--cv 2" in card["reproduce"]
    assert card["calibration"]["temperature"] == report["calibration"]["temperature"]
    assert card["rejection"]["not_a_digit"] == report["rejection"]["not_a_digit"]
    assert "2-fold cross-validation" in card["metadata"]["validation_split"]
    done = digits("evaluate", "--model", str(model), "--data-dir", str(run / "heldout"), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["count"] == 100
    # The fold models as ONNX, each beside its held-out digits, give back the out-of-fold outputs.
    from service.recognition.model import load_model
    from service.recognition.preprocess import normalize
    from training.recipe.fold_models import export_fold_models

    pairs = export_fold_models(run, data, tmp_path / "folds")
    out_of_fold = np.load(run / "out-of-fold.npz")
    row_of = {int(i): row for row, i in enumerate(out_of_fold["idx"])}
    for (folder, fold_model), fold in zip(pairs, indices["folds"], strict=True):
        held = load_split(folder, "test")
        np.testing.assert_array_equal(held.images, load_split(data, "train").images[fold])
        served = load_model(fold_model, "cpu", 1)
        logits, _ = served.run(normalize(held.images, served.metadata.normalization))
        np.testing.assert_allclose(logits, out_of_fold["logits"][[row_of[i] for i in fold]], atol=1e-4)
        assert served.metadata.calibration is not None
        assert served.metadata.calibration.temperature == report["calibration"]["temperature"]


def test_export_bad_checkpoint(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    done = digits("export", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x.onnx"))
    assert_clean_error(done, "digits export: error:", "nope.pt: checkpoint not found")


# --- download ------------------------------------------------------------------------------------


def test_download_offline_fails_fast_with_hint(tmp_path: Path) -> None:
    done = digits("download", "--data-dir", str(tmp_path), env={"DIGITS_MNIST_MIRROR": "http://127.0.0.1:1/"})
    assert_clean_error(done, "could not download train-images-idx3-ubyte.gz", "http://127.0.0.1:1/", "--data-dir")
    assert not list(tmp_path.iterdir())  # no partial files left behind


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on 127.0.0.1 serving the files of a temporary directory."""
    root = tmp_path / "mirror"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=root))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", root
    finally:
        server.shutdown()
        server.server_close()


def test_download_rejects_wrong_sha256(mirror: tuple[str, Path], tmp_path: Path, mnist_small_dir: Path) -> None:
    url, root = mirror
    wrong = (mnist_small_dir / "train-images-idx3-ubyte.gz").read_bytes()
    (root / "train-images-idx3-ubyte.gz").write_bytes(wrong)
    with pytest.raises(DownloadError, match=r"sha256 mismatch \(expected 440fcabf.*, got [0-9a-f]{64}\)"):
        download_mnist(tmp_path / "data", [url], log=lambda _: None)
    assert not (tmp_path / "data" / "train-images-idx3-ubyte.gz").exists()


def test_download_verifies_and_skips_present_files(
    mirror: tuple[str, Path], tmp_path: Path, mnist_small_dir: Path
) -> None:
    url, root = mirror
    expected = {}
    for source in mnist_small_dir.glob("*.gz"):
        (root / source.name).write_bytes(source.read_bytes())
        expected[source.name] = hashlib.sha256(source.read_bytes()).hexdigest()
    messages: list[str] = []
    files = download_mnist(tmp_path / "data", ["http://127.0.0.1:1/", url], expected=expected, log=messages.append)
    assert sorted(p.name for p in files) == sorted(expected)
    assert all("downloaded from" in m for m in messages)
    messages.clear()
    download_mnist(tmp_path / "data", ["http://127.0.0.1:1/"], expected=expected, log=messages.append)
    assert all("already present" in m for m in messages)
