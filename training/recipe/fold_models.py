"""A cross-validation's fold models as ONNX files, each beside the pool digits it never trained on.

Choosing anything for a model on the digits it trained on flatters the model; choosing it on the test
digits spends them. The fold models of a `digits train --cv` run give a third way: fold k's model never
saw fold k's digits, so every choice made on (fold k's digits, fold k's model) pairs is made on unseen
digits, as the test figures are, and none of the test digits is touched. The number reader's weights
are fitted this way (docs/reading.md):

    python -m training.recipe.fold_models runs/lenet5 --data-dir ../shared/data/mnist-sample --out-dir runs/folds
    python -m service.perf.reading.fit_scoring --data-dir runs/folds/fold-1 --model runs/folds/fold-1.onnx ...

Each fold model gets the run's temperature (fitted on all out-of-fold outputs), so its probabilities
are calibrated as the shipped model's are; no rejection rule is attached.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from service.recognition.model_metadata import Calibration, ModelMetadata
from training.data import NORMALIZATION, Digits, load_source, write_split
from training.export import LABELS, MODEL_NAME, write_onnx
from training.model import lenet5


def export_fold_models(run_dir: Path, data_dir: Path, out_dir: Path) -> list[tuple[Path, Path]]:
    """Write ``fold-k.onnx`` and the IDX folder ``fold-k/`` (its held-out digits) for every fold of
    `run_dir`; returns the (digits folder, model) pairs."""
    report = json.loads((run_dir / "report.json").read_text())
    indices = json.loads((run_dir / "heldout" / "indices.json").read_text())
    _, _, images, labels = load_source(data_dir)
    temperature = float(report["calibration"]["temperature"])
    deskew = bool(report["recipe"].get("deskew", False))
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = []
    for k, fold in enumerate(indices["folds"], start=1):
        held = np.asarray(fold)
        folder = out_dir / f"fold-{k}"
        write_split(folder, "test", Digits(images[held], labels[held], f"fold {k} of {run_dir}", {}))
        model = lenet5(deskew)
        model.load_state_dict(torch.load(run_dir / "models" / f"fold-{k}.pt", weights_only=True))
        metadata = ModelMetadata(
            name=MODEL_NAME, version=f"fold-{k}", normalization=NORMALIZATION, labels=LABELS,
            calibration=Calibration(temperature=temperature, extra={"fitted_on": "out-of-fold outputs"}),
            extra={"fold_of": str(run_dir), "held_out_digits": str(len(held))})
        path = out_dir / f"fold-{k}.onnx"
        write_onnx(model.eval(), path, metadata.to_props(), temperature=temperature)
        pairs.append((folder, path))
    return pairs


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.recipe.fold_models RUN_DIR --data-dir DIR --out-dir DIR``."""
    parser = argparse.ArgumentParser(prog="python -m training.recipe.fold_models", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a `digits train --cv` run directory (report.json, models/)")
    parser.add_argument("--data-dir", type=Path, required=True, help="the run's --data-dir")
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    pairs = export_fold_models(args.run_dir, args.data_dir, args.out_dir)
    print(" ".join(f"--data-dir {folder} --model {model}" for folder, model in pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
