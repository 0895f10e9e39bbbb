"""k-fold cross-validation of a recipe, and the other trainings a pipeline needs, in parallel processes.

A `Task` trains one LeNet-5 on some digits of the source file and returns its logits on the digits it
is measured on (as MNIST arrays and as clients send them) and on generated negatives. Tasks run in
`jobs` processes (spawned, one torch thread each); each task's result depends only on its own seed, so
any number of jobs gives the same numbers. Tasks that distil from teachers run after their teachers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from service.recognition import strokes
from training.data import stratified_folds
from training.recipe.config import TrainConfig
from training.synth.clientstyle import client_style
from training.synth.negatives import (
    EVAL_KINDS,
    MADE_OF_DIGITS,
    TRAIN_KINDS,
    Negatives,
    eval_counts,
    generate,
    training_counts,
)

NEGATIVES_PER_KIND = 300
"""Validation and measuring negatives of each kind (fewer for small data: one per 20 pool digits)."""


@dataclass(frozen=True)
class Task:
    """Train one model on `train_idx` (indices into the source file), measure it on `eval_idx`."""

    name: str
    seed: int
    train_idx: np.ndarray
    eval_idx: np.ndarray
    teachers: tuple[str, ...] = ()
    """Names of the tasks whose models it distils from (they run first)."""
    external_teachers: tuple[str, ...] = ()
    """Model files of earlier runs it also distils from."""
    teacher: bool = False
    """A teacher: trained with `teacher_config` as the recipe's teacher network."""


@dataclass
class Shared:
    """What every task reads: the source digits and the images generated once for all tasks."""

    config: TrainConfig
    images: np.ndarray
    labels: np.ndarray
    model_dir: Path
    renders: np.ndarray | None = None
    """[V, N, 28, 28] client-style training renders of every source digit."""
    eval_renders: np.ndarray | None = None
    """[N, 28, 28] client-style renders of every source digit, with a seed training never uses."""
    negatives: np.ndarray | None = None
    """Training negatives of the kinds not made of digits (those come from each task's own digits)."""
    val_negatives: Negatives | None = None
    eval_negatives: Negatives | None = None
    per_kind: int = NEGATIVES_PER_KIND
    test_idx: np.ndarray | None = None
    """The test part: every model is also measured there (only measured: nothing is chosen with it)."""


@dataclass
class TaskResult:
    """A task's outputs: logits on its measuring digits (both views) and on the negatives."""

    name: str
    eval_idx: np.ndarray
    logits: np.ndarray
    client_logits: np.ndarray
    val_negative_logits: np.ndarray
    val_negative_kinds: np.ndarray
    eval_negative_logits: np.ndarray
    eval_negative_kinds: np.ndarray
    seconds: float
    test_logits: np.ndarray | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    shapes: dict[str, np.ndarray] = field(default_factory=dict)
    """`strokes.features` of the pixels behind `logits`, `client_logits`, `val_negative_logits` and
    `eval_negative_logits`: keys digits, client, val, eval."""


def digit_kinds(kinds: Iterable[str]) -> list[str]:
    """The negative kinds made of real digits (made per task, from that task's own digits)."""
    return [kind for kind in kinds if kind in MADE_OF_DIGITS]


def prepare_shared(config: TrainConfig, images: np.ndarray, labels: np.ndarray, model_dir: Path,
                   log: Callable[[str], None] = print, pool_size: int | None = None) -> Shared:
    """Generate, once, the renders and negatives that every task shares."""
    from training.recipe.loop import negatives_pool, training_renders
    from training.synth.clientstyle import EVAL_RENDER_SEED
    from training.synth.negatives import NEGATIVES_EVAL_SEED, NEGATIVES_VAL_SEED

    tick = time.perf_counter()
    everything = np.arange(len(images))
    per_kind = max(10, min(NEGATIVES_PER_KIND, (pool_size or len(images)) // 20))
    shared = Shared(config=config, images=images, labels=labels, model_dir=model_dir, per_kind=per_kind)
    if config.client_style > 0:
        shared.renders = training_renders(images, everything, config.client_variants)
    shared.eval_renders = client_style(images, EVAL_RENDER_SEED, everything)
    plain = [kind for kind in TRAIN_KINDS if kind not in digit_kinds(TRAIN_KINDS)]
    if config.oe_weight > 0:
        shared.negatives = negatives_pool(config, len(images), None, kinds=plain)
    val_counts = dict.fromkeys(plain, per_kind)
    shared.val_negatives = generate(val_counts, NEGATIVES_VAL_SEED)
    eval_plain = {k: n for k, n in eval_counts(per_kind).items() if k not in digit_kinds(EVAL_KINDS)}
    shared.eval_negatives = generate(eval_plain, NEGATIVES_EVAL_SEED)
    log(f"generated client-style renders and negatives in {time.perf_counter() - tick:.0f}s")
    return shared


_SHARED: Shared | None = None


def _init_worker(shared: Shared, threads: int) -> None:
    global _SHARED
    _SHARED = shared
    from training.recipe.loop import configure_torch

    configure_torch(0, threads)


def _concat(a: Negatives, b: Negatives) -> Negatives:
    return Negatives(np.concatenate([a.images, b.images]), np.concatenate([a.kinds, b.kinds]))


def run_task(task: Task, shared: Shared | None = None) -> TaskResult:
    """Train and measure one task (in a worker process, or here when `shared` is given)."""
    import torch

    from training.model import teacher_kind, teacher_model
    from training.recipe.config import teacher_config
    from training.recipe.loop import as_input, build_training_set, fit, logits_of
    from training.synth.negatives import NEGATIVES_EVAL_SEED, NEGATIVES_TRAIN_SEED, NEGATIVES_VAL_SEED

    shared = shared or _SHARED
    assert shared is not None, "run_task needs the shared data"
    config = shared.config
    tick = time.perf_counter()
    images = shared.images[task.train_idx]
    negatives = None
    if config.oe_weight > 0:
        # The digit-made negatives come from this task's own training digits: never from digits it is measured on.
        counts = {k: n for k, n in training_counts(round(config.oe_per_digit * len(shared.images))).items()
                  if k in digit_kinds(TRAIN_KINDS)}
        assert shared.negatives is not None
        negatives = np.concatenate([shared.negatives, generate(counts, NEGATIVES_TRAIN_SEED, images).images])
    renders = shared.renders[:, task.train_idx] if shared.renders is not None else None
    data = build_training_set(config, images, shared.labels[task.train_idx], task.train_idx, renders, negatives)
    teachers = []
    # This run's teachers, then earlier runs' models (LeNet-5s, or wide teachers copied in).
    for path in [shared.model_dir / f"{name}.pt" for name in task.teachers] + [Path(p) for p in task.external_teachers]:
        state = torch.load(path, weights_only=True)
        teacher = teacher_model(teacher_kind(state), config.deskew)
        teacher.load_state_dict(state)
        teachers.append(teacher.eval())
    if task.teacher:
        model, history = fit(teacher_config(config), data, task.seed, name=task.name,
                             architecture=config.teacher_model)
    else:
        model, history = fit(config, data, task.seed, teachers, name=task.name)
    shared.model_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), shared.model_dir / f"{task.name}.pt")

    eval_digits = shared.images[task.eval_idx]
    assert shared.val_negatives is not None and shared.eval_negatives is not None and shared.eval_renders is not None
    eval_renders = shared.eval_renders[task.eval_idx]
    made = dict.fromkeys(digit_kinds(TRAIN_KINDS), shared.per_kind)
    val_negatives = _concat(shared.val_negatives, generate(made, NEGATIVES_VAL_SEED, eval_digits)
                            if len(eval_digits) else Negatives(np.zeros((0, 28, 28), np.uint8), np.zeros(0, object)))
    made = dict.fromkeys(digit_kinds(EVAL_KINDS), shared.per_kind)
    eval_negatives = _concat(shared.eval_negatives, generate(made, NEGATIVES_EVAL_SEED, eval_digits)
                             if len(eval_digits) else Negatives(np.zeros((0, 28, 28), np.uint8), np.zeros(0, object)))
    return TaskResult(
        name=task.name,
        eval_idx=task.eval_idx,
        logits=logits_of(model, as_input(eval_digits)),
        client_logits=logits_of(model, as_input(eval_renders)),
        val_negative_logits=logits_of(model, as_input(val_negatives.images)),
        val_negative_kinds=val_negatives.kinds,
        eval_negative_logits=logits_of(model, as_input(eval_negatives.images)),
        eval_negative_kinds=eval_negatives.kinds,
        seconds=time.perf_counter() - tick,
        history=history,
        test_logits=None if shared.test_idx is None else logits_of(model, as_input(shared.images[shared.test_idx])),
        shapes={"digits": strokes.features(eval_digits), "client": strokes.features(eval_renders),
                "val": strokes.features(val_negatives.images), "eval": strokes.features(eval_negatives.images)},
    )


def default_jobs() -> int:
    """One job per CPU this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_tasks(tasks: Sequence[Task], shared: Shared, jobs: int, log: Callable[[str], None] = print) -> dict[str,
                                                                                                          TaskResult]:
    """Run every task (teachers before their students) in `jobs` processes; results by task name."""
    results: dict[str, TaskResult] = {}
    levels = [[t for t in tasks if not t.teachers], [t for t in tasks if t.teachers]]
    if jobs <= 1:
        for level in levels:
            for task in level:
                results[task.name] = run_task(task, shared)
                log(f"{task.name}: {results[task.name].seconds:.0f}s")
        return results
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(shared, 1)) as pool:
        for level in levels:
            futures = {task.name: pool.submit(run_task, task) for task in level}
            for name, future in futures.items():
                results[name] = future.result()
                log(f"{name}: {results[name].seconds:.0f}s")
    return results


def fold_tasks(config: TrainConfig, pool_idx: np.ndarray, labels: np.ndarray, folds: int) -> list[Task]:
    """One task per fold of `pool_idx` (stratified, split seed), plus teachers when distilling.

    Fold k's model has seed ``seed * 100 + k``; its teachers ``seed * 100 + 10 * j + k`` for j = 1..teachers.
    """
    tasks: list[Task] = []
    parts = stratified_folds(labels[pool_idx], folds, config.split_seed)
    for k, part in enumerate(parts, start=1):
        held = pool_idx[part]
        train = np.setdiff1d(pool_idx, held)
        tasks += model_tasks(config, f"fold-{k}", config.seed * 100 + k, train, held)
    return tasks


def model_tasks(config: TrainConfig, name: str, seed: int, train_idx: np.ndarray, eval_idx: np.ndarray) -> list[Task]:
    """The task for one model, preceded by its teachers' tasks when the recipe distils."""
    teachers = [Task(f"{name}-teacher-{j}", seed + 10 * j, train_idx, eval_idx, teacher=True)
                for j in range(1, config.teachers + 1)]
    external = tuple(str(Path(run) / "models" / f"{name}.pt") for run in config.teachers_from)
    missing = [path for path in external if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"--teachers-from: no model {missing[0]} (run the teacher recipe with --cv first)")
    return [*teachers, Task(name, seed, train_idx, eval_idx, tuple(t.name for t in teachers), external)]


def test_part_figures(results: dict[str, TaskResult], labels: np.ndarray, test_idx: np.ndarray) -> dict[str, Any]:
    """Every cross-validation model on the test part (trained on fewer digits than the final model, so
    this measures what training on the whole pool adds), and their ensemble (mean softmax)."""
    from training.quality.calibration import softmax
    from training.quality.metrics import mean_sd, proportion

    outputs = [r.test_logits for n, r in results.items()
               if n.startswith("fold-") and "teacher" not in n and r.test_logits is not None]
    if not outputs or not len(test_idx):
        return {}
    truth = labels[test_idx]
    right = [int((logits.argmax(1) == truth).sum()) for logits in outputs]
    ensemble = np.mean([softmax(logits) for logits in outputs], axis=0)
    return {"fold_models_accuracy_mean_sd": mean_sd([k / truth.size for k in right]),
            "fold_models_accuracy": [proportion(k, int(truth.size)) for k in right],
            "fold_ensemble_accuracy": proportion(int((ensemble.argmax(1) == truth).sum()), int(truth.size))}


def summarize_folds(results: dict[str, TaskResult], labels: np.ndarray) -> dict[str, Any]:
    """Per-fold and pooled out-of-fold figures of the fold models (raw probabilities, temperature 1)."""
    from training.quality.calibration import ece, nll, softmax
    from training.quality.metrics import mean_sd, proportion

    folds = sorted((r for name, r in results.items() if name.startswith("fold-") and "teacher" not in name),
                   key=lambda r: int(r.name.split("-")[1]))
    per_fold: list[dict[str, Any]] = []
    for result in folds:
        truth = labels[result.eval_idx]
        right = result.logits.argmax(1) == truth
        client_right = result.client_logits.argmax(1) == truth
        per_fold.append({
            "fold": result.name, "count": int(truth.size),
            "accuracy": proportion(int(right.sum()), int(truth.size)),
            "client_style_accuracy": proportion(int(client_right.sum()), int(truth.size)),
            "nll": nll(result.logits, truth), "ece_raw": ece(softmax(result.logits), truth),
            "train_seconds": round(result.seconds, 1),
        })
    accuracy = [f["accuracy"]["value"] for f in per_fold]
    client = [f["client_style_accuracy"]["value"] for f in per_fold]
    pooled = sum(f["accuracy"]["successes"] for f in per_fold)
    count = sum(f["count"] for f in per_fold)
    teachers = _teacher_ensembles(results, labels)
    return {
        "folds": per_fold,
        "accuracy_mean_sd": mean_sd(accuracy),
        "client_style_accuracy_mean_sd": mean_sd(client),
        "pooled_accuracy": proportion(pooled, count),
        "pooled_client_style_accuracy": proportion(sum(f["client_style_accuracy"]["successes"] for f in per_fold),
                                                   count),
        **({"teacher_ensemble_accuracy_mean_sd": mean_sd(teachers)} if teachers else {}),
    }


def _teacher_ensembles(results: dict[str, TaskResult], labels: np.ndarray) -> list[float]:
    """Accuracy per fold of the mean softmax of that fold's teachers (what the student distils from)."""
    from training.quality.calibration import softmax

    scores = []
    for name, result in results.items():
        if not name.startswith("fold-") or "teacher" in name:
            continue
        mine = [r.logits for n, r in results.items() if n.startswith(f"{name}-teacher-")]
        if mine:
            mean = np.mean([softmax(logits) for logits in mine], axis=0)
            scores.append(float((mean.argmax(1) == labels[result.eval_idx]).mean()))
    return scores
