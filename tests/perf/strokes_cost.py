"""What the strokes test adds to a batch, measured beside the batch's session.run in one process:

    python tests/perf/strokes_cost.py [--model models/lenet5.onnx] [--seconds 2]

For each batch size, rounds alternate between `model.run` alone and `model.run` followed by
`strokes.features` on the same normalized input (what the batcher's inference thread does per batch),
and the medians of the two are reported side by side, with their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from service.recognition import strokes
from service.recognition.model import load_model
from service.recognition.preprocess import normalize
from tests.harness import fixture_digits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/lenet5.onnx"))
    parser.add_argument("--seconds", type=float, default=2.0, help="per batch size and variant")
    args = parser.parse_args(argv)
    model = load_model(args.model, "cpu", 1)
    norm = model.metadata.normalization
    images, _ = fixture_digits()
    print("| batch | session.run | + strokes test | strokes test alone | ratio |")
    print("|---|---|---|---|---|")
    for batch in (1, 8, 64, 256):
        inputs = normalize(np.resize(images, (batch, 28, 28)), norm)
        plain: list[float] = []
        both: list[float] = []
        alone: list[float] = []
        deadline = time.perf_counter() + 2 * args.seconds
        while time.perf_counter() < deadline or len(plain) < 20:
            began = time.perf_counter()
            model.run(inputs)
            middle = time.perf_counter()
            model.run(inputs)
            strokes.features(inputs[:, 0], paper=-norm.mean / norm.std)
            ended = time.perf_counter()
            strokes.features(inputs[:, 0], paper=-norm.mean / norm.std)
            plain.append(middle - began)
            both.append(ended - middle)
            alone.append(time.perf_counter() - ended)
        run, extra, only = (statistics.median(v) * 1e6 for v in (plain, both, alone))
        print(f"| {batch} | {run:.0f} µs | {extra:.0f} µs | {only:.0f} µs | {extra / run:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
