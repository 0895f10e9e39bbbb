"""ONNX export: a single valid file, dynamic batch, metadata contract, parity with PyTorch, model card."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from service.recognition.model_metadata import INPUT_NAME, LOGITS_OUTPUT, PROBABILITIES_OUTPUT, ModelMetadata

pytest.importorskip("torch")

from training.export import ExportError, check_parity

PROVENANCE = (
    "training_data",
    "training_data_sha256",
    "val_accuracy",
    "test_accuracy",
    "validation_split",
    "test_split",
    "training_commit",
    "created_at",
    "torch_version",
    "onnx_version",
    "opset",
    "params",
    "seed",
    "epochs",
    "command",
)


def test_single_valid_file(exported_model: Any) -> None:
    path: Path = exported_model.path
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(path.name)] == [path.name]
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert path.stat().st_size < 1_000_000


def test_signature_and_dynamic_batch(exported_model: Any) -> None:
    session = ort.InferenceSession(str(exported_model.path), providers=["CPUExecutionProvider"])
    (image,) = session.get_inputs()
    assert image.name == INPUT_NAME and image.type == "tensor(float)"
    assert image.shape[1:] == [1, 28, 28] and isinstance(image.shape[0], str)
    assert [o.name for o in session.get_outputs()] == [LOGITS_OUTPUT, PROBABILITIES_OUTPUT]
    for batch in (1, 3, 300):
        logits, probabilities = session.run(None, {INPUT_NAME: np.zeros((batch, 1, 28, 28), np.float32)})
        assert logits.shape == probabilities.shape == (batch, 10)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_metadata_contract_and_provenance(exported_model: Any, short_run: Any) -> None:
    props = {p.key: p.value for p in onnx.load(str(exported_model.path)).metadata_props}
    metadata = ModelMetadata.from_props(props)
    assert metadata.name == "lenet5" and metadata.version == "0.0.1-test"
    assert metadata.normalization.scale == pytest.approx(1 / 255)
    assert (metadata.normalization.mean, metadata.normalization.std) == (0.1307, 0.3081)
    assert metadata.labels == tuple("0123456789")
    assert metadata.ink_polarity == "light_on_dark"
    missing = [key for key in PROVENANCE if not metadata.extra.get(key)]
    assert not missing
    assert metadata.extra["params"] == "61706"
    assert float(metadata.extra["val_accuracy"]) == pytest.approx(short_run.best_val_acc, abs=1e-4)
    assert float(metadata.extra["test_accuracy"]) == pytest.approx(short_run.test_acc, abs=1e-4)
    assert json.loads(metadata.extra["training_data_sha256"]).keys() == {
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
    }


def test_parity_and_model_card(exported_model: Any) -> None:
    assert exported_model.parity_max_diff <= 1e-5
    card = json.loads(exported_model.card_path.read_text())
    assert exported_model.card_path == exported_model.path.with_suffix(".json")
    assert card["sha256"] == hashlib.sha256(exported_model.path.read_bytes()).hexdigest()
    assert card["parity"]["digits"] == 256
    assert card["reproduce"] == "pytest"
    assert ModelMetadata.from_props(card["metadata"]).version == "0.0.1-test"


def test_check_parity_passes_and_fails() -> None:
    reference = np.random.default_rng(0).random((256, 10), dtype=np.float32)
    assert check_parity(reference, reference + 5e-6) == pytest.approx(5e-6, rel=0.01)
    off = reference.copy()
    off[17, 3] += 1e-3
    with pytest.raises(ExportError, match=r"differs from PyTorch by 0.001 .* on digit 17"):
        check_parity(reference, off)
    nan = reference.copy()
    nan[2, 2] = np.nan
    with pytest.raises(ExportError, match="parity"):
        check_parity(reference, nan)
    with pytest.raises(ExportError, match="shape"):
        check_parity(reference, reference[:10])


def test_calibration_and_rule_are_fitted_on_the_fixture_and_baked_in(exported_model: Any, short_run: Any,
                                                                    mnist_small_dir: Path) -> None:
    import torch

    from training.data import prepare_splits
    from training.model import LeNet5
    from training.quality.calibration import fit_temperature, nll
    from training.recipe.loop import as_input, logits_of
    from training.synth.clientstyle import EVAL_RENDER_SEED, client_style
    from training.train import load_checkpoint

    metadata = ModelMetadata.from_props({p.key: p.value for p in onnx.load(str(exported_model.path)).metadata_props})
    assert metadata.calibration is not None and metadata.rejection is not None
    # Recompute: the temperature is the NLL optimum on the run's own validation digits (both views).
    model = LeNet5()
    model.load_state_dict(load_checkpoint(short_run.best_checkpoint)["model_state"])
    val = prepare_splits(mnist_small_dir, 100).val
    logits = np.concatenate([logits_of(model, as_input(val.images)),
                             logits_of(model, as_input(client_style(val.images, EVAL_RENDER_SEED)))])
    labels = np.concatenate([val.labels, val.labels]).astype(np.int64)
    assert metadata.calibration.temperature == pytest.approx(fit_temperature(logits, labels), rel=1e-6)
    assert nll(logits, labels, metadata.calibration.temperature) <= nll(logits, labels, 1.0)
    # The graph serves softmax(logits / T) and still returns the raw logits.
    session = ort.InferenceSession(str(exported_model.path), providers=["CPUExecutionProvider"])
    onnx_logits, probabilities = session.run(None, {INPUT_NAME: as_input(val.images).numpy()})
    np.testing.assert_allclose(onnx_logits, logits[: len(val)], atol=1e-4)
    expected = torch.softmax(torch.from_numpy(onnx_logits) / metadata.calibration.temperature, dim=1).numpy()
    np.testing.assert_allclose(probabilities, expected, atol=1e-6)
    assert metadata.rejection.extra["chosen_on"]["data"].startswith("the model's outputs on its 100 validation")


def test_training_commit_says_when_the_model_making_code_was_uncommitted(tmp_path: Path) -> None:
    """A model trained from a tree with uncommitted recipe changes must not claim a clean commit."""
    import subprocess

    from training.export import git_commit

    assert git_commit(tmp_path) == "unknown"  # not a checkout

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "recipe.py").write_text("EPOCHS = 80\n")
    (tmp_path / "notes.md").write_text("notes\n")
    git("add", "-A")
    git("commit", "-qm", "one")
    head = git("rev-parse", "HEAD")
    assert git_commit(tmp_path / "training") == head
    (tmp_path / "notes.md").write_text("other notes\n")  # not model-making code
    (tmp_path / "training" / "scratch.py").write_text("x = 1\n")  # untracked: not what trained it
    assert git_commit(tmp_path) == head
    (tmp_path / "training" / "recipe.py").write_text("EPOCHS = 40\n")
    assert git_commit(tmp_path / "training") == f"{head}-dirty"
