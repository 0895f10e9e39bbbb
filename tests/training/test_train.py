"""Short real training runs on the committed fixture: learning, repeatability, resume, outputs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from training.data import load_split  # noqa: E402
from training.train import TrainConfig, TrainError, learning_rate, load_checkpoint, train  # noqa: E402


def quiet(_: str) -> None:
    pass


def config(data_dir: Path, out_dir: Path, **changes: Any) -> TrainConfig:
    base = TrainConfig(data_dir=data_dir, out_dir=out_dir, epochs=2, seed=11, val_size=100, progress=False, threads=1)
    return replace(base, **changes)


def weights(checkpoint: Path) -> dict[str, Any]:
    return load_checkpoint(checkpoint)["model_state"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_short_run_learns(short_run: Any) -> None:
    # 400 training digits, 20 epochs: far above chance (0.1) on 100 validation and 300 test digits.
    assert short_run.best_val_acc > 0.5
    assert short_run.test_acc > 0.5
    assert len(short_run.history) == 20
    assert short_run.history[-1]["train_loss"] < short_run.history[0]["train_loss"]


def test_run_outputs(short_run: Any) -> None:
    out = short_run.best_checkpoint.parent
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, 21))
    assert set(records[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"}
    assert {r["lr"] for r in records} == {1e-3}  # constant schedule
    assert (out / "training-curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = load_checkpoint(short_run.best_checkpoint)
    assert best["epoch"] == short_run.best_epoch
    assert best["best_val_acc"] == max(r["val_acc"] for r in records)
    assert best["normalization"] == {"scale": 1 / 255, "mean": 0.1307, "std": 0.3081}
    assert best["seed"] == 3 and "test_accuracy" in best
    assert set(best["data"]["training_data_sha256"]) == {
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
    }
    # With real t10k files in the data dir, they are the test set: nothing is written to hold out.
    indices = json.loads((out / "heldout" / "indices.json").read_text())
    assert len(indices["validation_indices"]) == 100 and indices["test_indices"] is None


def test_cosine_schedule(tmp_path: Path) -> None:
    cfg = config(tmp_path, tmp_path, epochs=4)
    assert [learning_rate(cfg, e) for e in (1, 2, 3, 4)] == pytest.approx([1e-3, 8.535e-4, 5e-4, 1.464e-4], rel=1e-3)
    assert learning_rate(replace(cfg, lr_schedule="constant"), 4) == 1e-3


def test_same_seed_same_weights(tmp_path: Path, mnist_small_dir: Path) -> None:
    first = train(config(mnist_small_dir, tmp_path / "a"), log=quiet)
    second = train(config(mnist_small_dir, tmp_path / "b"), log=quiet)
    assert_same_weights(first.last_checkpoint, second.last_checkpoint)
    assert first.history == [dict(r, seconds=s["seconds"]) for r, s in zip(second.history, first.history, strict=True)]
    other = train(config(mnist_small_dir, tmp_path / "c", seed=12, epochs=1), log=quiet)
    assert not torch.equal(
        weights(other.last_checkpoint)["classifier.5.bias"],
        weights(first.last_checkpoint)["classifier.5.bias"],
    )


def test_resume_equals_uninterrupted(tmp_path: Path, mnist_small_dir: Path) -> None:
    straight = train(config(mnist_small_dir, tmp_path / "straight", epochs=3), log=quiet)
    train(config(mnist_small_dir, tmp_path / "split", epochs=1), log=quiet)
    resumed = train(
        config(mnist_small_dir, tmp_path / "split", epochs=3, resume=tmp_path / "split" / "last.pt"),
        log=quiet,
    )
    assert_same_weights(straight.last_checkpoint, resumed.last_checkpoint)
    assert [r["val_acc"] for r in resumed.history] == [r["val_acc"] for r in straight.history]
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_resume_on_other_data_is_refused(tmp_path: Path, mnist_small_dir: Path) -> None:
    first = train(config(mnist_small_dir, tmp_path / "a", epochs=1, augment=False), log=quiet)
    other = tmp_path / "other"
    train_digits = load_split(mnist_small_dir, "train")
    from training.data import write_split

    write_split(other, "train", train_digits.subset(np.arange(300), "first 300"))
    with pytest.raises(TrainError, match="trained on different data"):
        train(config(other, tmp_path / "b", epochs=2, test_size=50, resume=first.last_checkpoint), log=quiet)


def test_holdout_written_without_t10k(tmp_path: Path, mnist_small_dir: Path) -> None:
    data = tmp_path / "data"
    from training.data import write_split

    write_split(data, "train", load_split(mnist_small_dir, "train"))
    result = train(config(data, tmp_path / "run", epochs=1, val_size=50, test_size=60), log=quiet)
    heldout = load_split(tmp_path / "run" / "heldout", "test")
    assert len(heldout) == 60
    indices = json.loads((tmp_path / "run" / "heldout" / "indices.json").read_text())
    assert len(indices["test_indices"]) == 60 and not set(indices["test_indices"]) & set(indices["validation_indices"])
    # The accuracy the run reports is the selected model's on exactly the files it wrote for `digits evaluate`.
    from training.model import LeNet5
    from training.train import measure, to_tensors

    model = LeNet5()
    model.load_state_dict(weights(result.best_checkpoint))
    assert measure(model, *to_tensors(heldout))[1] == result.test_acc
    assert abs(result.test_acc * 60 - round(result.test_acc * 60)) < 1e-9  # a count of the 60 held-out digits


def test_bad_checkpoint_is_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(TrainError, match=r"bad.pt: not a readable checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(TrainError, match=r"missing.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_wide_teacher_distils_into_one_lenet5(tmp_path: Path, mnist_small_dir: Path) -> None:
    # A larger CNN teaches; what the run makes (and `digits export` ships) is still one LeNet-5.
    from training.model import EXPECTED_PARAMETERS, LeNet5, count_parameters

    plain = train(config(mnist_small_dir, tmp_path / "plain", epochs=1), log=quiet)
    taught = train(config(mnist_small_dir, tmp_path / "taught", epochs=1, teachers=1, teacher_model="wide",
                          teacher_epochs=2), log=quiet)
    model = LeNet5()
    model.load_state_dict(weights(taught.last_checkpoint))
    assert count_parameters(model) == EXPECTED_PARAMETERS
    # Same seed and digits: only the teacher's loss made the weights differ.
    assert not torch.equal(weights(taught.last_checkpoint)["classifier.5.bias"],
                           weights(plain.last_checkpoint)["classifier.5.bias"])
    assert load_checkpoint(taught.last_checkpoint)["config"]["teacher_model"] == "wide"


def test_weight_average_keeps_batch_norm_statistics() -> None:
    # The wide teacher normalizes its batches: an average of its weights with the initial statistics
    # (mean 0, variance 1) would read every digit through the wrong scale.
    from training.model import WideTeacher
    from training.recipe.loop import Ema

    teacher = WideTeacher()
    average = Ema(teacher, 0.998)
    teacher.train()
    teacher(torch.randn(32, 1, 28, 28) * 3 + 2)
    average.update(teacher)
    for mine, theirs in zip(average.model.buffers(), teacher.buffers(), strict=True):
        assert torch.equal(mine, theirs)
    statistics = dict(average.model.named_buffers())["features.1.running_mean"]
    assert float(statistics.abs().sum()) > 0
