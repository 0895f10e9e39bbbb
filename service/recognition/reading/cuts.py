"""Candidate cuts through one component of ink that may hold touching digits (`segment`, step 3).

For each slant of SLANTS, a dynamic programme finds the least-ink paths from the top row to the bottom
row through the local minima of the middle row; a path pays the ink it crosses, in stroke widths, and
LATERAL_COST for every step off its slant. Drop-fall paths (a ball falling from the top or the bottom
row around the strokes) join them: where digits overlap they follow one digit's contour into the
valley where the two touch. The cheapest, less alike than CUT_SPACING and leaving ink on both sides,
are the candidates.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

MIN_SPLIT_WIDTH = 0.35  # of L: narrower components are never cut (two touching 1s are about this wide)
MIN_PIECE_WIDTH = 0.1  # of L: no cut closer than this to a component's side in its middle row
CUT_SPACING = 0.12  # of L: cuts closer than this on average (over the rows) are one cut
CUTS_PER_WIDTH = 0.15  # of L: at most one cut per this much width (0.25 left the right cut out of overlaps)
MAX_CUT_STROKES = 3.5  # cuts crossing more ink than this many stroke widths are not candidates
MIN_SIDE_INK = 0.1  # a cut leaves at least this share of its component's ink on either side
LATERAL_COST = 0.1  # stroke widths per step off a cut's slant: it bends only where that saves ink
SLANTS = (-0.6, -0.3, 0.0, 0.3, 0.6)  # x per row: the slants of candidate cuts (digits lean both ways)
DROP_SEED_SPACING = 0.1  # of L: drop-fall seeds along the top and bottom rows
FAINT_REACH = 2  # working pixels: faint ink (below the threshold) this close to a component is its own

Cut = tuple[float, np.ndarray]  # (stroke widths crossed, column per row of the component's box; columns
# may lie outside the box where a slanted cut passes beside the component)


def candidate_cuts(cost: np.ndarray, line: float, inked: np.ndarray) -> list[Cut]:
    """Candidate cuts of one component, given its ink in stroke widths per pixel (`cost`, its box
    widened by FAINT_REACH) and which of its pixels are ink (`inked`): for each slant of SLANTS, the
    least-ink top-to-bottom paths through the local minima of the middle row, and the drop-fall paths
    (`_drop_falls`); the cheapest, leaving out repeats and slivers."""
    height, width = cost.shape
    if width - 2 * FAINT_REACH < MIN_SPLIT_WIDTH * line or height < 2:
        return []
    # Ink left of column x in each row, to tell how a path shares the component's ink.
    left_of = np.concatenate((np.zeros((height, 1)), np.cumsum(cost, axis=1)), axis=1)
    total = float(left_of[:, -1].sum())
    margin = FAINT_REACH + max(1, round(MIN_PIECE_WIDTH * line))
    most = int(np.ceil((width - 2 * FAINT_REACH) / (CUTS_PER_WIDTH * line)))
    found: list[Cut] = []
    paths = _slanted_paths(cost, margin, line, 2 * most) + _drop_falls(cost, inked, margin, line)
    for strokes, path in sorted(paths, key=lambda c: c[0]):
        if len(found) >= most or strokes > MAX_CUT_STROKES:
            break
        if any(np.abs(path - other).mean() < CUT_SPACING * line for _, other in found):
            continue  # the same cut as a cheaper one
        left = float(left_of[np.arange(height), np.clip(path, 0, width)].sum())
        if min(left, total - left) < MIN_SIDE_INK * total:
            continue  # a sliver off the side: no digit ends there
        found.append((strokes, path))
    return found


def _drop_falls(cost: np.ndarray, inked: np.ndarray, margin: int, line: float) -> list[Cut]:
    """Drop-fall paths: from seeds along the top (and, turned over, the bottom) row, a ball that falls
    straight where it can, else down to one side (left first, or right first), and only where all three
    pixels below are ink cuts down through it. Between overlapping digits it runs along the contour of
    one of them into the valley where they touch, where a path of one slant would cross strokes."""
    height, width = cost.shape
    step = max(1, round(DROP_SEED_SPACING * line))
    seeds = np.arange(margin, width - margin, step)
    if not seeds.size:
        return []
    # The four falls (upright and turned over, each left first and right first) side by side, so that
    # one pass over the rows moves every ball: [fall, seed].
    free = np.pad(~np.stack((inked, inked[::-1])), ((0, 0), (0, 0), (1, 1)), constant_values=False)  # outside: blocked
    turned = np.array([0, 0, 1, 1])[:, None]
    first = np.array([-1, 1, -1, 1])[:, None]
    x = np.broadcast_to(seeds, (4, seeds.size)).copy()
    paths = np.empty((4, height, seeds.size), dtype=np.int64)
    paths[:, 0] = x
    for y in range(height - 1):
        below = free[:, y + 1]
        straight, near, far = below[turned, x + 1], below[turned, x + 1 + first], below[turned, x + 1 - first]
        x = np.where(straight, x, np.where(near, x + first, np.where(far, x - first, x)))
        paths[:, y + 1] = x
    paths[2:] = paths[2:, ::-1].copy()
    along = np.ascontiguousarray(paths.transpose(0, 2, 1))  # [fall, seed, row]
    strokes = cost[np.arange(height), along].sum(axis=-1)
    return [(float(strokes[f, k]), along[f, k]) for f in range(4) for k in range(seeds.size)]


def cross(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two cuts cross (each is left of the other somewhere)."""
    return bool((a < b).any() and (a > b).any())


def _slanted_paths(cost: np.ndarray, margin: int, line: float, most: int) -> list[Cut]:
    """For each slant of SLANTS (x per row, > 0: the top leans right), the least-cost paths of that
    lean through the `most` cheapest local minima of the middle row, in the component box's columns."""
    height, width = cost.shape
    middle = height // 2
    rows = np.arange(height)[:, None]
    sheared: list[np.ndarray] = []
    columns: list[np.ndarray] = []
    for slant in SLANTS:
        # Shear so that paths of this slant are vertical: row y moves by `shift[y]` columns.
        shift = np.rint(slant * (middle - np.arange(height))).astype(np.int64)
        pad = int(np.abs(shift).max())
        original = np.arange(width + 2 * pad)[None, :] - pad - shift[:, None]  # original column of each cell
        inside = (original >= 0) & (original < width)
        sheared.append(np.where(inside, cost[rows, np.clip(original, 0, width - 1)], 0.0))
        columns.append(original)
    # Every slant's descent from the top and from the bottom in one pass over the rows (the row loop
    # is the cost; its numpy calls take all ten at once). Narrower shears sit left in the stack, with
    # infinite cost to their right, which no path takes while a finite one exists.
    widest = max(a.shape[1] for a in sheared)
    stack = np.full((2 * len(SLANTS), height, widest), np.inf)
    for i, a in enumerate(sheared):
        stack[2 * i, :, :a.shape[1]] = a
        stack[2 * i + 1, :, :a.shape[1]] = a[::-1]
    totals, steps = _descend(stack)
    paths: list[Cut] = []
    for i, (a, original) in enumerate(zip(sheared, columns, strict=True)):
        pad = (a.shape[1] - width) // 2
        n = a.shape[1]
        down, down_step = totals[2 * i, :, :n], steps[2 * i, :, :n]
        up, up_step = totals[2 * i + 1, :, :n], steps[2 * i + 1, :, :n]
        through = down[middle] + up[height - 1 - middle] - a[middle]
        # Ties (a wide gap) are broken towards the column with least ink nearby: the gap's middle.
        nearby = ndimage.uniform_filter1d(a.sum(axis=0), max(1, round(CUT_SPACING * line)))
        through_tied = through + 1e-3 * nearby
        x = np.arange(pad + margin, pad + width - margin)  # the middle row is not shifted
        x = x[(through_tied[x] <= through_tied[x - 1]) & (through_tied[x] <= through_tied[x + 1])]
        x = x[np.argsort(through[x], kind="stable")[:most]]  # only the cheapest can be kept
        paths += [(float(through[j]), original[np.arange(height), _trace(int(j), middle, down_step, up_step)])
                  for j in x]
    return paths


def _descend(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least cost of a path from the top row to every pixel of each [..., height, width] plane, moving
    down one row per step and at most one column sideways (LATERAL_COST each), and the step taken into
    each pixel (-1, 0, 1)."""
    height, width = cost.shape[-2:]
    total = np.empty_like(cost)
    step = np.zeros(cost.shape, dtype=np.int8)
    total[..., 0, :] = cost[..., 0, :]
    from_left = np.full((*cost.shape[:-2], width), np.inf)
    from_right = np.full((*cost.shape[:-2], width), np.inf)
    for y in range(1, height):
        above = total[..., y - 1, :]
        from_left[..., 1:] = above[..., :-1] + LATERAL_COST
        from_right[..., :-1] = above[..., 1:] + LATERAL_COST
        best = np.minimum(np.minimum(from_left, from_right), above)
        total[..., y, :] = cost[..., y, :] + best
        # Straight down wins ties, then from the left.
        step[..., y, :] = np.where(best == above, 0, np.where(best == from_left, -1, 1))
    return total, step


def _trace(x: int, middle: int, down_step: np.ndarray, up_step: np.ndarray) -> np.ndarray:
    """The path through (middle, x): back up along `down_step`, back down along `up_step`."""
    height = down_step.shape[0]
    path = np.empty(height, dtype=np.int64)
    path[middle] = x
    for y in range(middle, 0, -1):
        path[y - 1] = path[y] + down_step[y, path[y]]
    for y in range(middle, height - 1):  # up_step's rows count from the bottom
        path[y + 1] = path[y] + up_step[height - 1 - y, path[y]]
    return path
