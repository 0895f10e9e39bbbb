"""Rejection end to end through a real server at default settings, as the issue's goals table asks:

    python tests/rejection_report.py [--digits runs/heldout-test] [--fashion /usr/share/datasets/fashion-mnist]

Every image is a file a client would send (PNG, JPEG or BMP, dark ink on a light page, any size), sent
with `DigitsClient` to a `digits serve` of the shipped model, and counted by the reason it comes back
with. Real digits: the model's 1,000 test digits (never trained on or chosen with). Non-digits: the
kinds training never draws (other fonts' letters and symbols; training/synth EVAL_KINDS) and
Fashion-MNIST's clothing (never used to train or to choose a threshold). Blanks: paper of every shade,
faint noise, specks. Each rate comes with its Wilson 95% interval. tests/api/test_rejection.py runs the
same sets, smaller, on the committed fixture.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from service.client import DigitsClient, Failure
from service.idx import load_digits
from tests.harness import ServerThread
from training.synth.clientstyle import EVAL_RENDER_SEED, FORMAT_WEIGHTS, FORMATS, digit_page
from training.synth.negatives import EVAL_KINDS, NEGATIVES_EVAL_SEED

FASHION = Path("/usr/share/datasets/fashion-mnist")


def encode(page: Image.Image, rng: np.random.Generator) -> bytes:
    """A dark-on-light page as a client's file: paper and ink levels vary, PNG, JPEG or BMP."""
    paper, ink = int(rng.integers(215, 256)), int(rng.integers(0, 61))
    page = page.point([ink + (paper - ink) * v // 255 for v in range(256)])
    fmt = FORMATS[int(rng.choice(len(FORMATS), p=FORMAT_WEIGHTS))]
    out = io.BytesIO()
    page.save(out, format=fmt, **({"quality": int(rng.integers(50, 96))} if fmt == "JPEG" else {}))
    return out.getvalue()


def pictures(images: np.ndarray, seed: int) -> Iterator[bytes]:
    """28x28 bright-on-dark pictures (digits, clothing) drawn on a page as a client sends them."""
    for index, picture in enumerate(images):
        rng = np.random.default_rng([seed, 1, index])
        yield encode(digit_page(picture, rng), rng)


def non_digits(kinds: list[str], per_kind: int, digits: np.ndarray) -> Iterator[bytes]:
    """The measuring kinds of non-digit that training never draws, as files."""
    for kind in kinds:
        for index in range(per_kind):
            rng = np.random.default_rng([NEGATIVES_EVAL_SEED, kinds.index(kind), index])
            page = EVAL_KINDS[kind](rng, digits)
            if isinstance(page, np.ndarray):  # raw textures: as a client's grey picture
                page = Image.fromarray(255 - page)
            yield encode(page, rng)


def blanks(count: int, seed: int = 7) -> Iterator[bytes]:
    """White, grey and black paper, faint noise and specks of dust, of any size."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        height, width = int(rng.integers(20, 400)), int(rng.integers(20, 400))
        level = int(rng.choice([255, 240, 200, 128, 40, 0]))
        page = np.full((height, width), level, np.float64)
        if index % 3 == 1:
            page += rng.normal(0, 6, page.shape)  # faint noise
        if index % 3 == 2:
            y, x = int(rng.integers(0, height - 3)), int(rng.integers(0, width - 3))
            page[y:y + 2, x:x + 2] = 255 - level  # a speck of dust
        yield encode(Image.fromarray(np.clip(page, 0, 255).astype(np.uint8)), rng)


def wilson(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    if not trials:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return centre - half, centre + half


def reasons(client: DigitsClient, files: list[bytes]) -> Counter[str]:
    """How many came back accepted, or with each rejection reason."""
    outcomes, _ = client.recognize_many(files, batch=64)
    counted: Counter[str] = Counter()
    for outcome in outcomes:
        assert not isinstance(outcome, Failure), outcome
        counted[outcome.rejection or "accepted"] += 1
    return counted


Row = tuple[str, str, Counter[str]]  # what was sent, what it should come back as, how it came back


def report(target: str, digits_dir: Path, fashion_dir: Path | None, per_kind: int) -> list[Row]:
    images, _ = load_digits(digits_dir)
    sets: list[tuple[str, str, list[bytes]]] = [
        ("real handwritten digits (client-style)", "accepted", list(pictures(images, EVAL_RENDER_SEED))),
        ("printed letters, fonts never trained on", "rejected",
         list(non_digits(["other_letters"], per_kind, images))),
        ("symbols never trained on", "rejected", list(non_digits(["other_symbols"], per_kind, images))),
        ("all measuring kinds of non-digit", "rejected", list(non_digits(list(EVAL_KINDS), per_kind, images))),
        ("blank images", "no_ink", list(blanks(300)))]
    if fashion_dir is not None and fashion_dir.is_dir():
        clothing, _ = load_digits(fashion_dir)  # the t10k files
        sets.insert(3, ("clothing (Fashion-MNIST t10k, first 2,000)", "rejected",
                        list(pictures(clothing[:2000], 3000))))
    with DigitsClient(target, timeout=120) as client:
        return [(name, want, reasons(client, files)) for name, want, files in sets]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits", type=Path, default=Path("runs/heldout-test"),
                        help="IDX folder of real digits the model never saw (default runs/heldout-test)")
    parser.add_argument("--fashion", type=Path, default=FASHION, help="Fashion-MNIST IDX folder")
    parser.add_argument("--per-kind", type=int, default=300, help="images of each non-digit kind")
    parser.add_argument("--without-strokes", action="store_true",
                        help="switch the strokes test off (--reject-filled-above 1 --reject-grey-inside-above 1): "
                             "the same model and images, the model's scores alone")
    args = parser.parse_args(argv)
    off: dict[str, Any] = {"reject_filled_above": 1.0, "reject_grey_inside_above": 1.0} if args.without_strokes else {}
    with ServerThread(**off) as server:
        rows = report(server.target, args.digits, args.fashion, args.per_kind)
        version = server.recognizer.model.version
    print(f"model lenet5 {version}, {'the strokes test off' if off else 'default thresholds'}, through a real server\n")
    print("| input | images | accepted | no_ink | not_a_digit | uncertain | goal met? |")
    print("|---|---|---|---|---|---|---|")
    for name, want, counted in rows:
        total = sum(counted.values())
        cells = []
        for key in ("accepted", "no_ink", "not_a_digit", "uncertain"):
            low, high = wilson(counted[key], total)
            cells.append(f"{100 * counted[key] / total:.1f}% ({100 * low:.1f}-{100 * high:.1f})")
        rejected = total - counted["accepted"]
        met = {"accepted": counted["accepted"] >= 0.99 * total, "rejected": rejected >= 0.95 * total,
               "no_ink": counted["no_ink"] == total}[want]
        print(f"| {name} | {total} | {' | '.join(cells)} | {'yes' if met else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
