"""The training subcommands of `digits`: train, evaluate, export, download.

Loaded by `digits` on every install, including servers without torch, so this module imports nothing
heavy: each handler imports what it needs when it runs, and the torch-based ones say how to install
the training extra when torch is missing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from training.recipe.config import TEACHER_MODELS

TORCH_HINT = "pip install '.[train]' torch==2.13.0"
DEFAULT_MODEL = "models/lenet5.onnx"


def _fail(command: str, message: str, code: int = 1) -> int:
    print(f"digits {command}: error: {message}", file=sys.stderr)
    return code


def _needs_torch(command: str) -> int | None:
    """None when torch imports, else the exit code after printing how to install it."""
    try:
        import torch  # noqa: F401  (the handler imports it right after; this only checks)
    except ImportError:
        return _fail(command, f"digits {command} needs the training extra: {TORCH_HINT}", 2)
    return None


# Exceptions whose message is meant for the user (anything else is a bug and keeps its traceback).
_USER_ERRORS = (
    ("training.data", "DataError"),
    ("service.recognition.model_metadata", "MetadataError"),
    ("training.download", "DownloadError"),
    ("training.evaluate", "ModelError"),
    ("training.train", "TrainError"),
    ("training.export", "ExportError"),
)


def _is_user_error(exc: Exception) -> bool:
    # Looked up in sys.modules, not imported: a module that raised its error is loaded already, and
    # importing training.train here would pull in torch for every command.
    if isinstance(exc, (FileNotFoundError, PermissionError)):
        return True
    for module, name in _USER_ERRORS:
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(exc, getattr(loaded, name)):
            return True
    return False


def _guarded(command: str, handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except Exception as exc:
            if not _is_user_error(exc):
                raise
            return _fail(command, str(exc))

    return run


# Options whose values are paths: recorded relative to the repository, so a model says the same wherever made.
_PATH_OPTIONS = {"data_dir", "out_dir", "resume", "model_out", "checkpoint", "out"}


def _command_line(command: str, args: argparse.Namespace, options: dict[str, str]) -> str:
    """The canonical `digits ...` line for the options that matter, to record in the model."""
    from training.data import display_path

    parts = ["digits", command]
    for dest, flag in options.items():
        value = getattr(args, dest)
        if value is True:
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            for item in value:
                parts += [flag, display_path(item)]  # the only list options are directories
        elif value is not None and value is not False:  # not `in (None, False)`: 0 == False would drop zeros
            parts += [flag, display_path(value) if dest in _PATH_OPTIONS else str(value)]
    return shlex.join(parts)


# `digits train` flag -> TrainConfig field, for every recipe setting (all recorded in the model's command).
RECIPE_FLAGS = {
    "epochs": "--epochs", "seed": "--seed", "lr": "--lr", "lr_schedule": "--lr-schedule",
    "batch_size": "--batch-size", "rotation_deg": "--rotation", "scale": "--scale", "shear": "--shear",
    "shift_px": "--shift", "elastic_alpha": "--elastic-alpha", "elastic_sigma": "--elastic-sigma",
    "elastic_probability": "--elastic-probability", "deskew": "--deskew",
    "dropout": "--dropout", "weight_decay": "--weight-decay",
    "label_smoothing": "--label-smoothing", "ema_decay": "--ema", "client_style": "--client-style",
    "client_variants": "--client-variants", "neighbours": "--neighbours",
    "neighbour_variants": "--neighbour-variants", "oe_weight": "--oe-weight", "oe_per_digit": "--oe-per-digit",
    "oe_batch": "--oe-batch", "teachers": "--teachers", "distill_weight": "--distill-weight",
    "distill_temperature": "--distill-temperature", "teacher_model": "--teacher-model",
    "teacher_epochs": "--teacher-epochs", "teachers_from": "--teachers-from",
}


# --- handlers --------------------------------------------------------------------------------------


def _train(args: argparse.Namespace) -> int:
    if (code := _needs_torch("train")) is not None:
        return code
    import shutil

    from training.export import export_checkpoint
    from training.train import TrainConfig, train

    options = {"data_dir": "--data-dir", "out_dir": "--out-dir", **RECIPE_FLAGS, "no_augment": "--no-augment"}
    if args.cv:
        options.update({"cv": "--cv", "cv_only": "--cv-only", "test_size": "--test-size"})
    else:
        options.update({"val_size": "--val-size", "test_size": "--test-size", "resume": "--resume"})
    options.update({"model_out": "--model-out", "version": "--version"})
    command = _command_line("train", args, options)
    config = TrainConfig(
        data_dir=Path(args.data_dir),
        out_dir=Path(args.out_dir),
        augment=not args.no_augment,
        val_size=args.val_size,
        test_size=args.test_size,
        resume=Path(args.resume) if args.resume else None,
        threads=args.threads,
        command=command,
        **{dest: getattr(args, dest) for dest in RECIPE_FLAGS if dest != "teachers_from"},
        teachers_from=tuple(args.teachers_from or ()),
    )
    model_out = Path(args.model_out) if args.model_out else config.out_dir / "lenet5.onnx"
    if args.cv:
        from training.recipe.crossval import default_jobs
        from training.recipe.pipeline import fold_summary, run_pipeline

        if args.resume:
            return _fail("train", "--resume continues a single run; it does not combine with --cv")
        result = run_pipeline(config, args.cv, args.jobs or default_jobs(), cv_only=args.cv_only)
        print(fold_summary(result.report))
        print(f"report: {result.report_path}")
        if result.checkpoint is None:
            return 0
        checkpoint = result.checkpoint
    else:
        checkpoint = train(config).best_checkpoint
    exported = export_checkpoint(checkpoint, model_out, version=args.version, command=command)
    curves = config.out_dir / "training-curves.png"
    if curves.is_file() and (model_out.parent / curves.name).resolve() != curves.resolve():
        shutil.copyfile(curves, model_out.parent / curves.name)
    print(
        f"wrote {exported.path} (sha256 {exported.sha256[:12]}..., parity max diff "
        f"{exported.parity_max_diff:.2g}) and {exported.card_path}"
    )
    heldout = config.out_dir / "heldout"
    print(f"measure it: digits evaluate --model {model_out} --data-dir {heldout}")
    return 0


def _export(args: argparse.Namespace) -> int:
    if (code := _needs_torch("export")) is not None:
        return code
    from training.data import has_split, load_split
    from training.export import PARITY_TOLERANCE, export_checkpoint
    from training.train import PARITY_DIGITS, load_checkpoint

    pixels = None
    if args.data_dir:
        split = "test" if has_split(args.data_dir, "test") else "train"
        pixels = load_split(args.data_dir, split).images[:PARITY_DIGITS]
    export_line = _command_line(
        "export",
        args,
        {"checkpoint": "--checkpoint", "out": "--out", "version": "--version", "data_dir": "--data-dir"},
    )
    trained_by = load_checkpoint(args.checkpoint)["config"].get("command") or "digits train ..."
    if getattr(args, "quantize", None):  # int8: training/quantize.py
        from training.quantize import run_export_quantized

        quantize_line = f"{export_line} --quantize {args.quantize}"
        return run_export_quantized(args, f"{trained_by} && {quantize_line}")
    result = export_checkpoint(
        args.checkpoint,
        args.out,
        version=args.version,
        command=f"{trained_by} && {export_line}",
        parity_pixels=pixels,
    )
    print(
        f"wrote {result.path} (sha256 {result.sha256}) and {result.card_path}; onnxruntime matches "
        f"PyTorch on {PARITY_DIGITS if pixels is None else len(pixels)} digits, max diff "
        f"{result.parity_max_diff:.2g} (tolerance {PARITY_TOLERANCE:g})"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import coverage_curves, evaluate, format_report, load_model

    if args.plot or args.curve:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return _fail("evaluate", "--plot and --curve need matplotlib: pip install matplotlib", 2)
    report = evaluate(args.model, args.data_dir, args.split, args.batch_size, client_style=args.client_style,
                      synthetic_negatives=args.negatives, fashion_mnist=args.fashion_mnist)
    if args.plot:
        from training.plots import plot_evaluation

        title = f"{report.model_name} {report.model_version}: {report.split} accuracy {report.accuracy:.2%}"
        plot_evaluation(report.confusion_matrix, [c.label for c in report.per_class], report.calibration,
                        args.plot, title)
    if args.curve:
        from training.plots import plot_coverage

        _, metadata = load_model(args.model)
        plot_coverage(coverage_curves(report, metadata), args.curve,
                      f"{report.model_name} {report.model_version}: coverage vs accuracy (dots: the model's rule)")
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(format_report(report))
        if args.plot:
            print(f"\nconfusion matrix and reliability diagram: {args.plot}")
        if args.curve:
            print(f"coverage-vs-accuracy curves: {args.curve}")
    return 0


def _download(args: argparse.Namespace) -> int:
    from training.download import download_mnist

    download_mnist(args.data_dir, args.mirror or None, timeout=args.timeout)
    return 0


# --- registration ----------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(subparsers: Any) -> None:
    """Add train, evaluate, export and download to the `digits` subparsers."""
    train = subparsers.add_parser(
        "train",
        help="train LeNet-5 on MNIST IDX files and export the best model to ONNX",
        description="Train LeNet-5 (needs torch), keep the best epoch on validation, export it to ONNX.",
    )
    train.add_argument("--data-dir", required=True, help="directory with train-*[.gz] (and t10k-*) IDX files")
    train.add_argument("--out-dir", required=True, help="run directory: checkpoints, metrics, held-out digits")
    recipe = train.add_argument_group("recipe (defaults: the shipped model's; docs/training.md measures each)")
    recipe.add_argument("--epochs", type=_positive_int, default=80, help="number of epochs (default 80)")
    recipe.add_argument("--seed", type=int, default=1, help="seed for init, shuffling, augmentation (default 1)")
    recipe.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate; the peak for onecycle (3e-3)")
    recipe.add_argument("--lr-schedule", choices=("onecycle", "cosine", "constant"), default="onecycle",
                        help="onecycle (default: warm-up to --lr over 30%%, cosine down), cosine decay, or constant")
    recipe.add_argument("--batch-size", type=_positive_int, default=128, help="digits per batch (default 128)")
    recipe.add_argument("--no-augment", action="store_true", help="disable the random distortions")
    recipe.add_argument("--rotation", dest="rotation_deg", type=float, default=12.0,
                        help="max rotation in degrees (default 12)")
    recipe.add_argument("--scale", type=float, default=0.12, help="max relative scale change (default 0.12)")
    recipe.add_argument("--shear", type=float, default=0.15, help="max shear (default 0.15)")
    recipe.add_argument("--shift", dest="shift_px", type=float, default=3.36,
                        help="max shift in pixels (default 3.36: 12%% of 28)")
    recipe.add_argument("--elastic-alpha", type=float, default=0.0, help="elastic distortion strength in pixels "
                        "(Simard: 34; default 0: off)")
    recipe.add_argument("--elastic-sigma", type=float, default=4.0, help="elastic smoothing in pixels (default 4)")
    recipe.add_argument("--elastic-probability", type=float, default=0.5, help="share of images distorted (0.5)")
    recipe.add_argument("--deskew", action="store_true", help="undo each digit's slant (moment-based "
                        "deskewing) in front of the network, in the exported graph too (default: off)")
    recipe.add_argument("--dropout", type=float, default=0.0, help="dropout after each hidden dense layer "
                        "while training (default 0: off)")
    recipe.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay, AdamW "
                        "(default 0: Adam)")
    recipe.add_argument("--label-smoothing", type=float, default=0.05, help="label smoothing (default 0.05)")
    recipe.add_argument("--ema", dest="ema_decay", type=float, default=0.998,
                        help="EMA decay of the weights per step (0: off; default 0.998)")
    recipe.add_argument("--client-style", type=float, default=0.5, help="share of digits shown as clients send "
                        "them, through the server's recipe (default 0.5)")
    recipe.add_argument("--client-variants", type=_positive_int, default=2, help="renders per digit (default 2)")
    recipe.add_argument("--neighbours", type=float, default=0.0, help="share of digits shown with a sliver of "
                        "a touching neighbour's ink, as the number reader's crops show them (default 0: off)")
    recipe.add_argument("--neighbour-variants", type=_positive_int, default=2,
                        help="neighbour renders per digit (default 2)")
    recipe.add_argument("--oe-weight", type=float, default=0.5, help="outlier-exposure loss weight (0: off; 0.5)")
    recipe.add_argument("--oe-per-digit", type=float, default=3.0, help="generated negatives per digit (default 3)")
    recipe.add_argument("--oe-batch", type=_positive_int, default=64, help="negatives per batch (default 64)")
    recipe.add_argument("--teachers", type=int, default=0, help="distil from this many teachers (0: off)")
    recipe.add_argument("--teacher-model", choices=TEACHER_MODELS, default="lenet5",
                        help="the teachers' network: lenet5, or wide, a larger CNN that only teaches (default lenet5)")
    recipe.add_argument("--teacher-epochs", type=int, default=0,
                        help="epochs of each teacher's training (default 0: --epochs)")
    recipe.add_argument("--distill-weight", type=float, default=0.5, help="share of the KD loss (default 0.5)")
    recipe.add_argument("--distill-temperature", type=float, default=2.0, help="KD temperature (default 2)")
    recipe.add_argument("--teachers-from", action="append", metavar="RUN_DIR",
                        help="with --cv: also distil from the same-named models of an earlier --cv run on the same "
                        "folds: LeNet-5s, or wide teachers copied in as fold-K.pt (repeatable)")
    train.add_argument("--cv", type=int, default=0, metavar="K", help="k-fold cross-validate the recipe on all but "
                       "the test digits, then train the final model on them, calibrate and choose thresholds on "
                       "the out-of-fold outputs, and measure it on the test digits (default 0: one run with a "
                       "validation part)")
    train.add_argument("--cv-only", action="store_true", help="with --cv: stop after cross-validation")
    train.add_argument("--jobs", type=int, default=0, help="with --cv: parallel trainings (default 0: one per CPU)")
    train.add_argument("--val-size", type=_positive_int, default=1000, help="validation digits (default 1000)")
    train.add_argument(
        "--test-size",
        type=int,
        default=1000,
        help="test digits held out when the data dir has no t10k-* files (default 1000; with --cv, 0 trains on all)",
    )
    train.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint (e.g. OUT_DIR/last.pt)")
    train.add_argument("--model-out", metavar="PATH.onnx", help="where to export (default OUT_DIR/lenet5.onnx)")
    train.add_argument("--version", default="1.0.0", help="model version written into the metadata")
    train.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (default 0: all CPUs available to the process)"
    )
    train.set_defaults(func=_guarded("train", _train))

    evaluate = subparsers.add_parser(
        "evaluate",
        help="accuracy, calibration, rejection, per-class figures and confusion matrix of an ONNX model",
        description="Run an exported model with onnxruntime (no torch needed) on a split of an IDX data dir.",
    )
    evaluate.add_argument("--model", default=DEFAULT_MODEL, help=f"ONNX model (default {DEFAULT_MODEL})")
    evaluate.add_argument("--data-dir", required=True, help="directory with the split's IDX files")
    evaluate.add_argument(
        "--split",
        choices=("test", "train"),
        default="test",
        help="test = t10k-* files (default), train = train-* files",
    )
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    evaluate.add_argument("--plot", metavar="FILE.png",
                          help="also draw the confusion matrix and, next to it, the reliability diagram")
    evaluate.add_argument("--client-style", action="store_true",
                          help="send each digit as a client would (black on white, any size, PNG/JPEG/BMP) through "
                          "the server's recipe first")
    evaluate.add_argument("--negatives", type=int, default=0, metavar="N",
                          help="also measure rejection on N generated non-digits of each kind training never draws")
    evaluate.add_argument("--fashion-mnist", metavar="DIR",
                          help="also measure rejection on Fashion-MNIST's t10k-* files in DIR (raw and client-style)")
    evaluate.add_argument("--curve", metavar="FILE.png",
                          help="draw coverage-vs-accuracy curves (digits, and digits mixed with each non-digit set)")
    evaluate.add_argument("--batch-size", type=_positive_int, default=1000, help="inference batch (default 1000)")
    evaluate.set_defaults(func=_guarded("evaluate", _evaluate))

    export = subparsers.add_parser(
        "export",
        help="export a training checkpoint to ONNX with serving metadata and a model card",
        description="Export a checkpoint (needs torch), verify onnxruntime against PyTorch, write the card.",
    )
    export.add_argument("--checkpoint", required=True, help="checkpoint from digits train (e.g. best.pt)")
    export.add_argument("--out", default=DEFAULT_MODEL, help=f"ONNX file to write (default {DEFAULT_MODEL})")
    export.add_argument("--version", default="1.0.0", help="model version written into the metadata")
    export.add_argument(
        "--data-dir", help="take the 256 parity digits from here (default: those stored in the checkpoint)"
    )
    export.add_argument(
        "--quantize",
        choices=("int8",),
        help="write a static int8 (QDQ, per-channel) model calibrated on real training digits instead; "
        "--out defaults to models/lenet5-int8.onnx",
    )
    export.set_defaults(func=_guarded("export", _export))

    download = subparsers.add_parser(
        "download",
        help="download the MNIST IDX files (sha256-verified)",
        description="Fetch the four MNIST .gz files from a mirror and verify their sha256.",
    )
    download.add_argument("--data-dir", required=True, help="directory to download into")
    download.add_argument(
        "--mirror",
        action="append",
        metavar="URL",
        help="mirror base URL (repeatable; default: $DIGITS_MNIST_MIRROR or the known mirrors)",
    )
    download.add_argument("--timeout", type=float, default=10.0, help="seconds per connection (default 10)")
    download.set_defaults(func=_guarded("download", _download))
