"""`digits train --cv K`: the shipped model, every figure measured on digits it never used.

1. Split the source digits: a test part (1,000 digits, the first shipped model's test digits) is set
   aside; the rest, the pool, is cut into K stratified folds.
2. Cross-validate the recipe: K models, each trained on K-1 folds, measured on the fold it left out
   (accuracy mean +- sd over folds: the headline).
3. Train the final model with the same recipe on the whole pool (`--cv-only` stops before).
4. Calibrate and choose thresholds on the out-of-fold outputs (each pool digit seen by a model that
   never trained on it) and on validation negatives: never on the test part.
5. Export the final model with its temperature and rejection rule, then measure it once on the test
   part (Wilson 95 % intervals) and on the negatives kept for measuring.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.recognition.model_metadata import Calibration, Rejection
from training.data import cv_split, display_path, load_source
from training.plots import plot_run_curves
from training.quality.calibration import ece, softmax
from training.quality.fit import calibrate_and_choose
from training.quality.thresholds import Outputs, measure_digits, measure_negatives
from training.recipe.config import TrainConfig
from training.recipe.crossval import (
    TaskResult,
    fold_tasks,
    model_tasks,
    prepare_shared,
    run_tasks,
    summarize_folds,
    test_part_figures,
)


@dataclass(frozen=True)
class PipelineResult:
    """Where the pipeline left its outputs."""

    report: dict[str, Any]
    report_path: Path
    checkpoint: Path | None
    """The final model's checkpoint (None with cv_only), ready for `digits export`."""


def _source(config: TrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """(images, labels, test indices, pool indices, data record) over train-* (+ t10k-* when present)."""
    train, test, images, labels = load_source(config.data_dir)
    if test is not None:
        test_idx, pool_idx = np.arange(len(train), len(images)), np.arange(len(train))
        test_rule = f"all {len(test)} digits of the t10k-* files"
        sha = {**train.sha256, **test.sha256}
    else:
        test_idx, pool_idx = cv_split(labels, config.test_size, config.split_seed)
        test_rule = (f"{len(test_idx)} digits held out of the train-* files: training.data.cv_split(labels, "
                     f"{config.test_size}, seed={config.split_seed}), the first shipped model's test digits")
        sha = train.sha256
    record = {
        "training_data": f"{train.source.split(' in ')[0]} in {display_path(config.data_dir)} "
                         f"[{len(pool_idx)} digits: the pool]",
        "training_data_sha256": sha,
        "test_split": test_rule if len(test_idx) else "none (every digit trained on; figures are cross-validated)",
        "counts": {"pool": len(pool_idx), "test": len(test_idx)},
    }
    return images, labels, test_idx, pool_idx, record


def _oof(results: dict[str, TaskResult], labels: np.ndarray) -> dict[str, np.ndarray]:
    folds = [r for n, r in results.items() if n.startswith("fold-") and "teacher" not in n]
    joined = {
        "idx": np.concatenate([r.eval_idx for r in folds]),
        "logits": np.concatenate([r.logits for r in folds]),
        "client_logits": np.concatenate([r.client_logits for r in folds]),
        "val_negatives": np.concatenate([r.val_negative_logits for r in folds]),
        "val_kinds": np.concatenate([r.val_negative_kinds for r in folds]),
        "eval_negatives": np.concatenate([r.eval_negative_logits for r in folds]),
        "eval_kinds": np.concatenate([r.eval_negative_kinds for r in folds]),
    }
    joined["labels"] = labels[joined["idx"]]
    if all(r.shapes for r in folds):
        for key in ("digits", "client", "val", "eval"):
            joined[f"{key}_shapes"] = np.concatenate([r.shapes[key] for r in folds])
    return joined


def measure_final(result: TaskResult, labels: np.ndarray, calibration: Calibration,
                  rule: Rejection) -> dict[str, Any]:
    """The final model on the test part and the negatives, with the temperature and rule chosen without them."""
    truth = labels[result.eval_idx]
    t = calibration.temperature
    shapes = result.shapes
    mnist = Outputs.of(result.logits, t, truth, shapes=shapes.get("digits"))
    client = Outputs.of(result.client_logits, t, truth, shapes=shapes.get("client"))
    matrix = np.zeros((10, 10), np.int64)
    np.add.at(matrix, (truth, result.logits.argmax(1)), 1)
    return {
        "mnist": {**measure_digits(rule, mnist), "ece_before": ece(softmax(result.logits), truth),
                  "ece_after": ece(mnist.probabilities, truth), "confusion_matrix": matrix.tolist()},
        "client_style": {**measure_digits(rule, client), "ece_before": ece(softmax(result.client_logits), truth),
                         "ece_after": ece(client.probabilities, truth)},
        "val_negatives": measure_negatives(rule, Outputs.of(result.val_negative_logits, t,
                                                            kinds=result.val_negative_kinds,
                                                            shapes=shapes.get("val")), mnist),
        "eval_negatives": measure_negatives(rule, Outputs.of(result.eval_negative_logits, t,
                                                             kinds=result.eval_negative_kinds,
                                                             shapes=shapes.get("eval")), mnist),
    }


def run_pipeline(config: TrainConfig, folds: int, jobs: int, cv_only: bool = False,
                 log: Callable[[str], None] = print) -> PipelineResult:
    """Cross-validate the recipe and (unless `cv_only`) train, calibrate and measure the final model."""
    started = time.perf_counter()
    images, labels, test_idx, pool_idx, record = _source(config)
    out_dir = config.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"data: {len(pool_idx)} pool digits in {folds} folds, {len(test_idx)} test digits; {jobs} job(s)")
    _write_heldout(out_dir / "heldout", images, labels, test_idx, pool_idx, folds, config.split_seed)
    shared = prepare_shared(config, images, labels, out_dir / "models", log, pool_size=len(pool_idx))
    shared.test_idx = test_idx if len(test_idx) else None
    tasks = fold_tasks(config, pool_idx, labels, folds)
    if not cv_only:
        tasks += model_tasks(config, "final", config.seed * 100, pool_idx, test_idx)
    results = run_tasks(tasks, shared, jobs, log)
    plot_run_curves({name: r.history for name, r in results.items() if "teacher" not in name},
                    out_dir / "training-curves.png")
    cv = summarize_folds(results, labels)
    mean, sd = cv["accuracy_mean_sd"]
    log(f"cross-validated accuracy {mean:.4f} +- {sd:.4f} over {folds} folds")
    oof = _oof(results, labels)
    calibration, rule, oof_figures = calibrate_and_choose(
        oof, f"out-of-fold outputs of the {folds} cross-validation models")
    arrays: dict[str, Any] = {k: v.astype(str) if v.dtype == object else v for k, v in oof.items()}
    np.savez_compressed(out_dir / "out-of-fold.npz", **arrays)
    _plot_validation_coverage(oof, calibration, rule, out_dir / "coverage-validation.png")
    report: dict[str, Any] = {
        "recipe": config.recipe(), "folds": folds, "data": record, "cross_validation": cv,
        "out_of_fold": oof_figures, "calibration": json.loads(calibration.to_json()),
        "rejection": json.loads(rule.to_json()),
    }
    checkpoint = None
    if not cv_only:
        final = results["final"]
        if len(test_idx):
            report["test"] = measure_final(final, labels, calibration, rule)
            report["test"]["cross_validation_models"] = test_part_figures(results, labels, test_idx)
            test_accuracy = report["test"]["mnist"]["accuracy"]
            log(f"final model on {len(test_idx)} test digits: accuracy {test_accuracy['value']:.4f} "
                f"(Wilson 95% {test_accuracy['wilson95'][0]:.4f}-{test_accuracy['wilson95'][1]:.4f})")
        checkpoint = _write_checkpoint(config, out_dir, images[pool_idx], record, report, calibration, rule)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report_path = out_dir / "report.json"
    report_path.write_text(json.dumps(report, indent=1, default=_plain) + "\n")
    return PipelineResult(report, report_path, checkpoint)


def _plot_validation_coverage(oof: dict[str, np.ndarray], calibration: Calibration, rule: Rejection,
                              path: Path) -> None:
    """Coverage-vs-accuracy on the validation data: out-of-fold digits, alone and mixed with negatives."""
    from training.plots import plot_coverage
    from training.quality.metrics import coverage_curve

    t = calibration.temperature
    digits = Outputs.of(oof["logits"], t, oof["labels"], shapes=oof.get("digits_shapes"))
    correct = digits.probabilities.argmax(1) == oof["labels"]

    def curve(outputs: Outputs, right: np.ndarray, score: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
        accepted = outputs.decide(rule) == ""
        return (*coverage_curve(outputs.score(score), right),
                (float(accepted.mean()), float(right[accepted].mean()) if accepted.any() else 0.0))

    curves = {f"{len(correct)} out-of-fold digits": curve(digits, correct, "max_probability")}
    for name, key, shapes in (("validation negatives", "val_negatives", "val_shapes"),
                              ("measuring negatives", "eval_negatives", "eval_shapes")):
        if len(oof[key]):
            negatives = Outputs.of(oof[key], t, shapes=oof.get(shapes))
            mixed = Outputs(np.concatenate([digits.logits, negatives.logits]),
                            np.concatenate([digits.probabilities, negatives.probabilities]),
                            shapes=_joined(digits.shapes, negatives.shapes))
            right = np.concatenate([correct, np.zeros(len(negatives.logits), bool)])
            curves[f"digits + {len(negatives.logits)} {name} (by {rule.not_a_digit.score})"] = curve(
                mixed, right, rule.not_a_digit.score)
    plot_coverage(curves, path, "Validation (out-of-fold): coverage vs accuracy (dots: the chosen rule)")


def _joined(first: np.ndarray | None, second: np.ndarray | None) -> np.ndarray | None:
    return None if first is None or second is None else np.concatenate([first, second])


def _write_heldout(directory: Path, images: np.ndarray, labels: np.ndarray, test_idx: np.ndarray,
                   pool_idx: np.ndarray, folds: int, seed: int) -> None:
    """The test digits as t10k-* files (for `digits evaluate`) and every part's indices."""
    from training.data import Digits, stratified_folds, write_split

    directory.mkdir(parents=True, exist_ok=True)
    if len(test_idx):
        write_split(directory, "test", Digits(images[test_idx], labels[test_idx], "test part", {}))
    parts = stratified_folds(labels[pool_idx], folds, seed)
    (directory / "indices.json").write_text(json.dumps({
        "seed": seed, "test_indices": test_idx.tolist(), "pool_indices": pool_idx.tolist(),
        "folds": [pool_idx[part].tolist() for part in parts],
        "note": "indices into train-* followed by t10k-* (when present) of the data dir",
    }) + "\n")


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON: {type(value).__name__}")


def _write_checkpoint(config: TrainConfig, out_dir: Path, pool_images: np.ndarray, record: dict[str, Any],
                      report: dict[str, Any], calibration: Calibration, rule: Rejection) -> Path:
    """The final model in the `digits train` checkpoint format, with what `digits export` writes out."""
    import torch

    from training.data import NORMALIZATION
    from training.recipe.config import CHECKPOINT_FORMAT, PARITY_DIGITS

    mean, sd = report["cross_validation"]["accuracy_mean_sd"]
    test = report.get("test", {}).get("mnist", {}).get("accuracy")
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "model_state": torch.load(out_dir / "models" / "final.pt", weights_only=True),
        "epoch": config.epochs,
        "best_epoch": config.epochs,
        "best_val_acc": mean,
        "normalization": {"scale": NORMALIZATION.scale, "mean": NORMALIZATION.mean, "std": NORMALIZATION.std},
        "seed": config.seed,
        "config": config.to_dict(),
        "data": {**record, "validation_split": f"{report['folds']}-fold cross-validation over the pool "
                                               f"(training.data.stratified_folds, seed {config.split_seed})"},
        "parity_images": torch.from_numpy(pool_images[:PARITY_DIGITS].copy()),
        "torch_version": str(torch.__version__),
        "test_accuracy": None if test is None else test["value"],
        "calibration": calibration.to_json(),
        "rejection": rule.to_json(),
        "figures": {"cv_accuracy": f"{mean:.4f} +- {sd:.4f} ({report['folds']} folds)"},
    }
    if test:
        checkpoint["figures"]["test_accuracy_wilson95"] = json.dumps([round(v, 4) for v in test["wilson95"]])
    path = out_dir / "final.pt"
    torch.save(checkpoint, path)
    return path


def fold_summary(report: dict[str, Any]) -> str:
    """A few lines for the console."""
    cv = report["cross_validation"]
    mean, sd = cv["accuracy_mean_sd"]
    cmean, csd = cv["client_style_accuracy_mean_sd"]
    oof = report["out_of_fold"]
    rule = report["rejection"]

    def rate(figures: dict[str, Any]) -> str:
        return f"{figures['rejected']['value']:.4%}"

    lines = [f"cross-validated accuracy {mean:.4%} +- {sd:.4%}; client-style {cmean:.4%} +- {csd:.4%}",
             f"temperature {report['calibration']['temperature']:.4f}; out-of-fold ECE "
             f"{oof['mnist']['ece_before']:.4f} -> {oof['mnist']['ece_after']:.4f}",
             f"rule: not_a_digit {rule['not_a_digit']}, uncertain {rule['uncertain']}",
             f"out-of-fold digits rejected {rate(oof['rejection_mnist'])} (client-style "
             f"{rate(oof['rejection_client_style'])}); negatives rejected: validation kinds "
             f"{rate(oof['val_negatives'])}"
             + (f", measuring kinds {rate(oof['eval_negatives'])}" if "eval_negatives" in oof else "")]
    if "test" in report:
        test = report["test"]
        accuracy = test["mnist"]["accuracy"]
        lines.append(f"test: accuracy {accuracy['value']:.4%} [{accuracy['wilson95'][0]:.4%}, "
                     f"{accuracy['wilson95'][1]:.4%}], rejected {rate(test['mnist'])} (client-style "
                     f"{rate(test['client_style'])}), ECE {test['mnist']['ece_before']:.4f} -> "
                     f"{test['mnist']['ece_after']:.4f}; negatives rejected {rate(test['eval_negatives'])}")
    return "\n".join(lines)
