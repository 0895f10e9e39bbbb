"""Training digits as the number reader cuts them out of touching numbers, and the reader's merged pieces.

The reader (`service.recognition.reading`) over-segments a line and lets the model choose: it reads
well when the model is sure of a digit cut out of its neighbours and unsure of a piece that holds two
digits. Both are learnt here from the reader's own crops. The training digits are laid three at a
time into touching numbers (`service.perf.numbers`, as the reader's figures are measured, but from
the run's own training digits only), each number is segmented, and:

- each digit gets the crop of the candidate that best covers its true box (IoU at least MATCH_IOU),
  through the MNIST recipe, as the model sees it when reading: a positive with the digit's label (a
  digit with no such candidate keeps its own image);
- each candidate that covers most of two digits' boxes is a merged piece: a negative, for the
  outlier-exposure loss.

Every number has its own random stream, ``default_rng([READER_SEED + variant, first digit's index])``,
so a run repeats exactly.
"""

from __future__ import annotations

import numpy as np

from service.perf.numbers import _attempt
from service.recognition.decode import decode
from service.recognition.preprocess import mnist_recipe
from service.recognition.reading.segment import segment

READER_SEED = 4000
GROUP = 3  # digits per number
MATCH_IOU = 0.7
MERGED_COVER = 0.5  # a candidate covering this share of two digits' boxes holds two digits
MERGED_PER_NUMBER = 2  # a number has tens of merged candidates, most alike: a few are kept


def _cover(box: tuple[int, int, int, int], truth: tuple[int, int, int, int]) -> tuple[float, float]:
    """(IoU, share of `truth` inside `box`)."""
    ax, ay, aw, ah = box
    bx, by, bw, bh = truth
    ix = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0, min(ay + ah, by + bh) - max(ay, by))
    inter = ix * iy
    return inter / (aw * ah + bw * bh - inter), inter / (bw * bh)


def reader_crops(images: np.ndarray, labels: np.ndarray, indices: np.ndarray,
                 variant: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(positives uint8 [N, 28, 28], one per digit of `images`, and merged negatives uint8 [M, 28, 28]).

    `indices` number the digits in their source file (the random streams follow them)."""
    positives = images.copy()
    negatives: list[np.ndarray] = []
    order = np.random.default_rng([READER_SEED + variant, len(images)]).permutation(len(images))
    for start in range(0, len(order) - 1, GROUP):
        group = order[start:start + GROUP]
        if len(group) < 2:
            break
        rng = np.random.default_rng([READER_SEED + variant, int(indices[group[0]])])
        number = None
        for _ in range(5):
            number = _attempt(images[group], labels[group], "touching", rng)
            if number is not None:
                break
        if number is None:
            continue
        found = segment(decode(number.png, 25_000_000))
        best = [(MATCH_IOU, -1)] * len(group)
        merged = []
        for c, candidate in enumerate(found.candidates):
            box = (candidate.box.x, candidate.box.y, candidate.box.width, candidate.box.height)
            covers = [_cover(box, truth) for truth in number.boxes]
            for j, (iou, _) in enumerate(covers):
                if iou >= best[j][0]:
                    best[j] = (iou, c)
            if sum(share >= MERGED_COVER for _, share in covers) >= 2:
                merged.append(c)
        for c in rng.permutation(merged)[:MERGED_PER_NUMBER]:
            negatives.append(mnist_recipe(found.candidates[int(c)].crop))
        for j, (_, c) in enumerate(best):
            if c >= 0:
                positives[group[j]] = mnist_recipe(found.candidates[c].crop)
    stacked = np.stack(negatives) if negatives else np.zeros((0, 28, 28), np.uint8)
    return positives, stacked
