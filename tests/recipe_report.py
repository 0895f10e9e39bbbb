"""Rejection of a recipe rather than of one model: the figures docs/training.md compares recipes with.

    # single runs (`digits train` without --cv), each model with its own rule:
    python tests/recipe_report.py --model runs/exp/B0/lenet5.onnx --model runs/exp/B3/lenet5.onnx
    # cross-validations: each fold model (python -m training.recipe.fold_models RUN --out-dir FOLDS ...)
    # with its run's rule (report.json), per fold and their mean:
    python tests/recipe_report.py --folds runs/exp/H22:runs/folds-H22 --folds runs/lenet5:runs/folds-230 \
        [--fashion /usr/share/datasets/fashion-mnist]
    # the operating point: the run's rule with its not_a_digit cut moved to reject more of the out-of-fold
    # digits, against the selection kinds (nothing is chosen with it: the rule's budgets stay):
    python tests/recipe_report.py --sweep runs/lenet5:runs/folds-230

Sets, decided as the server decides (the rule and the strokes test), shares rejected:
- the selection kinds (`held_symbols`; `held_font_letters` and `held_font_symbols`, in Liberation),
  `other_symbols` and `other_letters`: 1,500 each of the measuring seed;
- the training kinds other than symbols, 300 each, drawn with seed 14, which neither training (11),
  threshold choice (12) nor measuring (13) uses: for choosing between recipes;
- with --fashion, Fashion-MNIST t10k raw and as client files (measured only, never chosen with).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from service.recognition import rejection, strokes
from service.recognition.model import load_model
from service.recognition.model_metadata import Rejection, Threshold
from service.recognition.preprocess import normalize
from training.data import load_split
from training.synth import negatives
from training.synth.clientstyle import EVAL_RENDER_SEED, client_style

SELECTION_SEED = 14
TRAINING_KINDS = ("letters", "strokes", "shapes", "scribbles", "blobs", "textures")


def image_sets(fashion: Path | None) -> dict[str, np.ndarray]:
    """Every set the report measures, as uint8 [N, 28, 28] model input."""
    sets = {kind: negatives.generate({kind: 1500}, negatives.NEGATIVES_EVAL_SEED).images
            for kind in (*negatives.SELECTION_KINDS, "other_symbols", "other_letters")}
    sets.update({f"{kind} (seed {SELECTION_SEED})": negatives.generate({kind: 300}, SELECTION_SEED).images
                 for kind in TRAINING_KINDS})
    if fashion is not None:
        clothes = load_split(fashion, "test").images
        sets["fashion raw"] = clothes
        sets["fashion files"] = client_style(clothes, EVAL_RENDER_SEED)
    return sets


def rejected(model_path: Path, rule: Rejection | None, sets: dict[str, np.ndarray]) -> dict[str, float]:
    """Share of each set that `rule` (default: the model's own) rejects."""
    model = load_model(model_path, "cpu", 1, warmup_batch=1)
    rule = rule or model.metadata.rejection
    shares = {}
    for name, pixels in sets.items():
        logits, probabilities = model.run(normalize(pixels, model.metadata.normalization))
        reasons = rejection.decide(rule, logits, probabilities, shapes=strokes.features(pixels))
        shares[name] = float(np.mean([bool(r) for r in reasons]))
    return shares


SWEEP_DIGITS_REJECTED = (0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03)
"""Shares of the out-of-fold digits (both views) that the swept not_a_digit cut alone rejects."""


def sweep(run: Path, folds: Path) -> None:
    """Print, for not_a_digit cuts at SWEEP_DIGITS_REJECTED, what the whole rule rejects of the run's
    out-of-fold digits (MNIST arrays / as clients send them) and of the selection kinds (fold models)."""
    report = json.loads((run / "report.json").read_text())
    rule = Rejection.from_json(json.dumps(report["rejection"]))
    oof = np.load(run / "out-of-fold.npz")
    views = {"arrays": (oof["logits"], oof["digits_shapes"]), "client": (oof["client_logits"], oof["client_shapes"])}
    calibrated = {name: (logits, _softmax(logits / report["calibration"]["temperature"]), shapes)
                  for name, (logits, shapes) in views.items()}
    pooled = np.concatenate([rejection.scores(rule.not_a_digit.score, logits, probabilities)
                             for logits, probabilities, _ in calibrated.values()])
    selection = {kind: negatives.generate({kind: 1500}, negatives.NEGATIVES_EVAL_SEED).images
                 for kind in negatives.SELECTION_KINDS}
    models = sorted(folds.glob("fold-*.onnx"))
    print(f"{run}: not_a_digit ({rule.not_a_digit.score}) moved; the rest of its rule kept; {len(models)} fold models")
    for share in SWEEP_DIGITS_REJECTED:
        cut = Threshold(rule.not_a_digit.score, float(np.quantile(pooled, share)))
        moved = dataclasses.replace(rule, not_a_digit=cut)
        digits = {name: np.mean([bool(r) for r in rejection.decide(moved, logits, probabilities, shapes=shapes)])
                  for name, (logits, probabilities, shapes) in calibrated.items()}
        per_fold = [rejected(path, moved, selection) for path in models]
        kinds = "  ".join(f"{kind} {100 * np.mean([shares[kind] for shares in per_fold]):.1f}%" for kind in selection)
        print(f"  cut below {moved.not_a_digit.below:.4f}: digits rejected {100 * digits['arrays']:.2f}% / "
              f"{100 * digits['client']:.2f}%  {kinds}")


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, action="append", default=[], help="a model with its own rule")
    parser.add_argument("--folds", action="append", default=[], metavar="RUN:FOLDS",
                        help="a `digits train --cv` run directory and its fold models' directory")
    parser.add_argument("--fashion", type=Path, default=None, help="Fashion-MNIST folder (t10k-* files)")
    parser.add_argument("--sweep", action="append", default=[], metavar="RUN:FOLDS",
                        help="move the run's not_a_digit cut and measure the selection kinds with its fold models")
    args = parser.parse_args()
    for pair in args.sweep:
        sweep(*(Path(p) for p in pair.split(":", 1)))
    if not (args.model or args.folds):
        return 0
    sets = image_sets(args.fashion)
    for model in args.model:
        shares = rejected(model, None, sets)
        print(model, "  ".join(f"{name} {100 * v:.1f}%" for name, v in shares.items()))
    for pair in args.folds:
        run, folds = (Path(p) for p in pair.split(":", 1))
        rule = Rejection.from_json(json.dumps(json.loads((run / "report.json").read_text())["rejection"]))
        per_fold = [rejected(path, rule, sets) for path in sorted(folds.glob("fold-*.onnx"))]
        print(f"{run} ({len(per_fold)} fold models with its rule)")
        for name in sets:
            values = [100 * shares[name] for shares in per_fold]
            print(f"  {name}: {np.mean(values):.2f}%  folds {', '.join(f'{v:.1f}' for v in values)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
