"""Which printed symbols the shipped model lets through, symbol by symbol:

    python tests/symbols_report.py [--model models/lenet5.onnx] [--count 2000] [--kind held_symbols]

The images are exactly the measuring kind `other_symbols` (training/synth/negatives.py: glyphs.EVAL_SYMBOLS in
fonts training never uses, never trained on or chosen with), the first COUNT of the measuring seed that
`digits evaluate --negatives` and tests/rejection_report.py draw from, as 28x28 model input. Each is decided
by the model's own rule (its thresholds and the strokes test), as the server decides. Prints, per symbol, the
share accepted and what it is read as. `--kind held_symbols` measures the symbols held out of training
for choosing between recipes instead (negatives.SELECTION_KINDS, glyphs.BROAD_HELD_OUT, training fonts).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from service.recognition import rejection, strokes
from service.recognition.model import load_model
from service.recognition.preprocess import normalize
from training.synth import negatives


def drawn_symbols(count: int, kind: str = "other_symbols") -> tuple[np.ndarray, list[str]]:
    """The first `count` symbols of `kind` as model input, and the character each one is."""
    texts: list[str] = []
    render = negatives.render_text

    def recording(text: str, *args: Any, **kwargs: Any) -> Any:
        texts.append(text)
        return render(text, *args, **kwargs)

    images, characters = [], []
    negatives.render_text = recording
    try:
        for index in range(count):
            texts.clear()
            images.append(negatives.make_one(kind, negatives.NEGATIVES_EVAL_SEED, index))
            characters.append(texts[-1])  # a redrawn image keeps the last one drawn
    finally:
        negatives.render_text = render
    return np.stack(images), characters


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/lenet5.onnx"))
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--kind", choices=("other_symbols", *negatives.SELECTION_KINDS), default="other_symbols")
    args = parser.parse_args()
    model = load_model(args.model, "cpu", 1, warmup_batch=1)
    images, characters = drawn_symbols(args.count, args.kind)
    logits, probabilities = model.run(normalize(images, model.metadata.normalization))
    reasons = rejection.decide(model.metadata.rejection, logits, probabilities, shapes=strokes.features(images))
    print(f"{args.model}: {args.count} {args.kind}, "
          f"{100 * sum(1 for r in reasons if r) / len(reasons):.1f}% rejected\n")
    print("| symbol | images | accepted | read as (accepted) |\n| --- | --- | --- | --- |")
    rows = []
    for symbol in sorted(set(characters)):
        mine = [i for i, c in enumerate(characters) if c == symbol]
        accepted = [int(probabilities[i].argmax()) for i in mine if not reasons[i]]
        read = ", ".join(f"{digit}: {n}" for digit, n in Counter(accepted).most_common(3))
        rows.append((len(accepted) / len(mine), symbol, len(mine), read))
    for share, symbol, n, read in sorted(rows, reverse=True):
        print(f"| {symbol} | {n} | {100 * share:.0f}% | {read} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
