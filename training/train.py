"""`digits train` without --cv: one run with a validation part, best-on-validation checkpoints, exact
resume, a metrics log; at the end, calibration and rejection thresholds fitted on the validation part.

Repeatability on CPU: one seed drives the weight init (torch.manual_seed) and a dedicated generator
drives shuffling and augmentation; deterministic algorithms are enforced. The generator state is saved
in every checkpoint, so "2 epochs" and "1 epoch, then --resume for 1 more" give identical weights.
The batches themselves (augmentation, client-style digits, negatives, EMA) are `training.recipe.loop`'s.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from service.recognition import strokes
from service.recognition.model_metadata import Calibration, Rejection
from training.data import NORMALIZATION, Digits, Splits, prepare_splits, write_split
from training.plots import plot_training_curves
from training.recipe.config import (
    CHECKPOINT_FORMAT,
    LR_SCHEDULES,
    PARITY_DIGITS,
    TrainConfig,
    learning_rate,
    teacher_config,
)
from training.recipe.loop import (
    as_input,
    build_augment,
    build_training_set,
    configure_torch,
    fit,
    logits_of,
    new_model,
    train_epoch,
)

__all__ = ["LR_SCHEDULES", "TrainConfig", "TrainError", "TrainResult", "learning_rate", "load_checkpoint", "train"]


class TrainError(RuntimeError):
    """A run cannot start or continue (e.g. resuming a checkpoint made on different data)."""


@dataclass
class TrainResult:
    """Where the run left its files and what it measured."""

    best_checkpoint: Path
    last_checkpoint: Path
    best_epoch: int
    best_val_acc: float
    test_acc: float
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def to_tensors(digits: Digits) -> tuple[torch.Tensor, torch.Tensor]:
    """Model input (the server's own normalize, with the normalization written into the model) and labels."""
    return as_input(digits.images), torch.from_numpy(digits.labels.astype(np.int64))


@torch.no_grad()
def measure(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` in eval mode."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, images.shape[0], 1024):
        logits = model(images[start : start + 1024])
        target = labels[start : start + 1024]
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(1) == target).sum())
    count = max(1, images.shape[0])
    return loss_sum / count, correct / count


def _data_record(splits: Splits) -> dict[str, Any]:
    return {
        "training_data": f"{splits.train.source}",
        "training_data_sha256": splits.train.sha256,
        "validation_split": splits.validation_description,
        "test_split": splits.test_description,
        "counts": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
    }


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `digits train` (plain tensors and values only: weights_only load)."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path}: checkpoint not found")
    try:
        checkpoint: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        raise TrainError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path}: not a `digits train` checkpoint (format {CHECKPOINT_FORMAT})")
    return checkpoint


def _save(checkpoint: dict[str, Any], path: Path) -> None:
    # Write then rename, so an interrupted run never leaves a half-written checkpoint behind.
    partial = path.with_suffix(".tmp")
    torch.save(checkpoint, partial)
    partial.replace(path)


def write_holdout(splits: Splits, directory: Path, seed: int) -> None:
    """Write the held-out test digits as t10k-* files (for `digits evaluate`) and every split's indices."""
    directory.mkdir(parents=True, exist_ok=True)
    if splits.test_is_holdout:
        write_split(directory, "test", splits.test)
    indices = {
        "seed": seed,
        "validation_description": splits.validation_description,
        "test_description": splits.test_description,
        "validation_indices": splits.val_indices.tolist(),
        "test_indices": None if splits.test_indices is None else splits.test_indices.tolist(),
    }
    (directory / "indices.json").write_text(json.dumps(indices) + "\n")


def train(config: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    """Run (or resume) training; writes checkpoints, metrics.jsonl, curves and the held-out files."""
    if config.lr_schedule not in LR_SCHEDULES:
        raise TrainError(f"unknown learning-rate schedule {config.lr_schedule!r}")
    if config.epochs < 1:
        raise TrainError("--epochs must be at least 1")
    configure_torch(config.seed, config.threads)
    splits = prepare_splits(config.data_dir, config.val_size, config.test_size, config.split_seed)
    out_dir = config.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    write_holdout(splits, out_dir / "heldout", config.split_seed)
    data = _data_record(splits)
    log(
        f"data: {len(splits.train)} train, {len(splits.val)} validation, {len(splits.test)} test digits "
        f"from {config.data_dir}; held-out test files in {out_dir / 'heldout'}"
    )

    train_set = build_training_set(config, splits.train.images, splits.train.labels, np.arange(len(splits.train)))
    val_x, val_y = to_tensors(splits.val)
    teachers = [fit(teacher_config(config), train_set, config.seed * 100 + 10 * j, name=f"teacher {j}",
                    architecture=config.teacher_model)[0]
                for j in range(1, config.teachers + 1)]
    model, optimizer, generator, ema = new_model(config, config.seed)
    augment = build_augment(config)
    history: list[dict[str, float]] = []
    best_val_acc, best_epoch, start_epoch = -1.0, 0, 1
    best_path, last_path = out_dir / "best.pt", out_dir / "last.pt"
    metrics_path = out_dir / "metrics.jsonl"

    if config.resume is not None:
        state = load_checkpoint(config.resume)
        if state["data"]["training_data_sha256"] != data["training_data_sha256"]:
            raise TrainError(f"{config.resume}: checkpoint was trained on different data files")
        model.load_state_dict(state.get("raw_state", state["model_state"]))
        optimizer.load_state_dict(state["optimizer_state"])
        generator.set_state(state["rng_state"])
        if ema is not None and "ema_state" in state:
            ema.load_state_dict(state["ema_state"])
        history = list(state["history"])
        best_val_acc, best_epoch = float(state["best_val_acc"]), int(state["best_epoch"])
        start_epoch = int(state["epoch"]) + 1
        log(f"resumed {config.resume} at epoch {start_epoch - 1} (best val acc {best_val_acc:.4f})")
        if best_epoch == int(state["epoch"]) and not best_path.exists():
            _save(state, best_path)
    # The log mirrors the history: rewrite it so a resumed run has no duplicated or stale epochs.
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))

    # Real digits for the export's ONNX-vs-PyTorch check, kept in the checkpoint so export needs no data.
    parity = torch.from_numpy(np.concatenate([splits.val.images, splits.train.images])[:PARITY_DIGITS])
    started = time.perf_counter()
    for epoch in range(start_epoch, config.epochs + 1):
        lr = learning_rate(config, epoch)
        tick = time.perf_counter()
        train_loss, train_acc = train_epoch(model, optimizer, train_set, config, generator, augment, epoch, ema,
                                            teachers, f"epoch {epoch}/{config.epochs}")
        evaluated = ema.model if ema is not None else model
        val_loss, val_acc = measure(evaluated, val_x, val_y)
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": lr,
            "seconds": round(time.perf_counter() - tick, 3),
        }
        history.append(record)
        with metrics_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        improved = val_acc > best_val_acc
        if improved:
            best_val_acc, best_epoch = val_acc, epoch
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "model_state": evaluated.state_dict(),
            "raw_state": model.state_dict(),
            "optimizer_state": optimizer.state_dict(),
            "rng_state": generator.get_state(),
            **({"ema_state": ema.state_dict()} if ema is not None else {}),
            "epoch": epoch,
            "best_val_acc": best_val_acc,
            "best_epoch": best_epoch,
            "val_acc": val_acc,
            "normalization": {
                "scale": NORMALIZATION.scale,
                "mean": NORMALIZATION.mean,
                "std": NORMALIZATION.std,
            },
            "seed": config.seed,
            "config": config.to_dict(),
            "data": data,
            "history": list(history),
            "parity_images": parity,
            "torch_version": str(torch.__version__),
        }
        _save(checkpoint, last_path)
        if improved:
            _save(checkpoint, best_path)
        log(
            f"epoch {epoch:3d}/{config.epochs}  train loss {train_loss:.4f} acc {train_acc:.4f}  "
            f"val loss {val_loss:.4f} acc {val_acc:.4f}  lr {lr:.2e}  {record['seconds']:.1f}s"
            + ("  *best*" if improved else "")
        )
    seconds = time.perf_counter() - started

    plot_training_curves(history, out_dir / "training-curves.png")
    # The test set is touched exactly once, by the selected model, after training is over.
    best = load_checkpoint(best_path)
    model.load_state_dict(best["model_state"])
    test_x, test_y = to_tensors(splits.test)
    _, test_acc = measure(model, test_x, test_y)
    calibration, rule = calibrate_on_validation(model, splits.val)
    best["test_accuracy"] = test_acc
    best["train_seconds"] = seconds
    best["calibration"], best["rejection"] = calibration.to_json(), rule.to_json()
    _save(best, best_path)
    log(
        f"best epoch {best_epoch}: val acc {best_val_acc:.4f}; held-out test acc {test_acc:.4f} "
        f"({len(splits.test)} digits); {seconds:.1f}s; temperature {calibration.temperature:.3f}"
    )
    return TrainResult(best_path, last_path, best_epoch, best_val_acc, test_acc, seconds, history)


def calibrate_on_validation(model: torch.nn.Module, val: Digits) -> tuple[Calibration, Rejection]:
    """Temperature and rejection rule fitted on the validation digits (as MNIST arrays and as clients
    send them) and on validation negatives (training kinds, other images); the test part is not used."""
    from training.quality.fit import calibrate_and_choose
    from training.synth.clientstyle import EVAL_RENDER_SEED, client_style
    from training.synth.negatives import NEGATIVES_VAL_SEED, TRAIN_KINDS, generate

    # As many negatives of each kind as half the validation digits (at most 300): enough to rank scores.
    negatives = generate(dict.fromkeys(TRAIN_KINDS, max(10, min(300, len(val) // 2))), NEGATIVES_VAL_SEED, val.images)
    renders = client_style(val.images, EVAL_RENDER_SEED)
    outputs = {
        "idx": np.arange(len(val)), "labels": val.labels.astype(np.int64),
        "logits": logits_of(model, as_input(val.images)), "client_logits": logits_of(model, as_input(renders)),
        "val_negatives": logits_of(model, as_input(negatives.images)), "val_kinds": negatives.kinds,
        "eval_negatives": np.zeros((0, 10), np.float32), "eval_kinds": np.zeros(0, object),
        "digits_shapes": strokes.features(val.images), "client_shapes": strokes.features(renders),
        "val_shapes": strokes.features(negatives.images), "eval_shapes": np.zeros((0, len(strokes.KEYS))),
    }
    calibration, rule, _ = calibrate_and_choose(outputs, f"the model's outputs on its {len(val)} validation digits")
    return calibration, rule
