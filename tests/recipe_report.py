"""Rejection of a recipe rather than of one model: the figures docs/training.md compares recipes with.

    # single runs (`digits train` without --cv), each model with its own rule:
    python tests/recipe_report.py --model runs/exp/B0/lenet5.onnx --model runs/exp/B3/lenet5.onnx
    # cross-validations: each fold model (python -m training.recipe.fold_models RUN --out-dir FOLDS ...)
    # with its run's rule (report.json), per fold and their mean:
    python tests/recipe_report.py --folds runs/exp/H22:runs/folds-H22 --folds runs/lenet5:runs/folds-230 \
        [--fashion /usr/share/datasets/fashion-mnist]

Sets, decided as the server decides (the rule and the strokes test), shares rejected:
- the selection kinds (`held_symbols`; `held_font_letters` and `held_font_symbols`, in Liberation),
  `other_symbols` and `other_letters`: 1,500 each of the measuring seed;
- the training kinds other than symbols, 300 each, drawn with seed 14, which neither training (11),
  threshold choice (12) nor measuring (13) uses: for choosing between recipes;
- with --fashion, Fashion-MNIST t10k raw and as client files (measured only, never chosen with).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from service.recognition import rejection, strokes
from service.recognition.model import load_model
from service.recognition.model_metadata import Rejection
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, action="append", default=[], help="a model with its own rule")
    parser.add_argument("--folds", action="append", default=[], metavar="RUN:FOLDS",
                        help="a `digits train --cv` run directory and its fold models' directory")
    parser.add_argument("--fashion", type=Path, default=None, help="Fashion-MNIST folder (t10k-* files)")
    args = parser.parse_args()
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
