"""One model's training: batches of real digits (some shown client-style) and generated negatives,
augmented together; label-smoothed cross-entropy, outlier exposure, optional distillation; Adam with
the configured schedule; an exponential moving average (EMA) of the weights.

Every random number comes from one `torch.Generator` seeded by the run's seed, and the images it
draws from are made reproducibly (`training.synth`), so a run repeats exactly on CPU.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from service.recognition.preprocess import normalize
from training.augment import AffineAugment
from training.data import NORMALIZATION
from training.model import lenet5, teacher_model
from training.recipe.config import TrainConfig, learning_rate
from training.synth.clientstyle import TRAIN_RENDER_SEED, client_style
from training.synth.negatives import NEGATIVES_TRAIN_SEED, generate, training_counts
from training.synth.neighbours import neighbour_renders


def configure_torch(seed: int, threads: int = 0) -> None:
    """Seed torch, demand deterministic kernels, and use `threads` CPUs (0: all this process may use)."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    if threads <= 0:
        # The affinity mask, not os.cpu_count(): containers and taskset often allow fewer CPUs.
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, threads))


@dataclass
class TrainingSet:
    """A run's training input, normalized: digits, their client-style renders, the negatives pool."""

    images: torch.Tensor
    """[N, 1, 28, 28]"""
    labels: torch.Tensor
    """[N] int64"""
    variants: torch.Tensor | None = None
    """[V, N, 1, 28, 28]: client-style renders of the same digits."""
    neighboured: torch.Tensor | None = None
    """[V, N, 1, 28, 28]: the same digits with slivers of touching neighbours' ink."""
    negatives: torch.Tensor | None = None
    """[M, 1, 28, 28] generated non-digits."""


def as_input(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [..., 28, 28] -> normalized model input [..., 1, 28, 28] (the server's own normalize)."""
    flat = pixels.reshape(-1, *pixels.shape[-2:])
    return torch.from_numpy(normalize(flat, NORMALIZATION)).reshape(*pixels.shape[:-2], 1, *pixels.shape[-2:])


def training_renders(images: np.ndarray, indices: np.ndarray, variants: int) -> np.ndarray:
    """uint8 [variants, N, 28, 28]: the client-style renders trained on (stable per digit index)."""
    return np.stack([client_style(images, TRAIN_RENDER_SEED + v, indices) for v in range(variants)])


def negatives_pool(config: TrainConfig, count_digits: int, digits: np.ndarray | None,
                   kinds: Sequence[str] | None = None) -> np.ndarray:
    """uint8 [M, 28, 28] training negatives for `count_digits` training digits (M = oe_per_digit x that).

    `kinds` limits which kinds are made (the digit-made kinds need `digits`, the run's training digits).
    """
    counts = training_counts(round(config.oe_per_digit * count_digits))
    if kinds is not None:
        counts = {kind: n for kind, n in counts.items() if kind in kinds}
    return generate(counts, NEGATIVES_TRAIN_SEED, digits).images


def build_training_set(config: TrainConfig, images: np.ndarray, labels: np.ndarray, indices: np.ndarray,
                       renders: np.ndarray | None = None, negatives: np.ndarray | None = None) -> TrainingSet:
    """Everything one run trains on; `renders`/`negatives` may be passed in when made once for many runs.

    `indices` number the digits in their source file, so each keeps its client-style renders.
    """
    if config.client_style > 0 and renders is None:
        renders = training_renders(images, indices, config.client_variants)
    if config.oe_weight > 0 and negatives is None:
        negatives = negatives_pool(config, len(images), images)
    neighboured = None
    if config.neighbours > 0:
        neighboured = np.stack([neighbour_renders(images, v, indices) for v in range(config.neighbour_variants)])
    return TrainingSet(
        images=as_input(images),
        labels=torch.from_numpy(labels.astype(np.int64)),
        variants=as_input(renders) if config.client_style > 0 and renders is not None else None,
        neighboured=as_input(neighboured) if neighboured is not None else None,
        negatives=as_input(negatives) if config.oe_weight > 0 and negatives is not None else None,
    )


def build_augment(config: TrainConfig) -> AffineAugment | None:
    """The configured distortion, or None when augmentation is off."""
    if not config.augment:
        return None
    return AffineAugment(
        background=-NORMALIZATION.mean / NORMALIZATION.std,
        max_rotation_deg=config.rotation_deg,
        max_shift_px=config.shift_px,
        scale_range=(1 - config.scale, 1 + config.scale),
        max_shear=config.shear,
        elastic_alpha=config.elastic_alpha,
        elastic_sigma=config.elastic_sigma,
        elastic_probability=config.elastic_probability,
    )


class Ema:
    """Exponential moving average of a model's weights, updated after every optimizer step.

    The decay ramps up as (1 + steps) / (10 + steps) until it reaches `decay`, so the first steps
    do not leave the random initial weights in the average for the rest of the run.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.steps = 0
        self.model = copy.deepcopy(model).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Move the average towards `model`'s current weights."""
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for average, current in zip(self.model.parameters(), model.parameters(), strict=True):
            average.mul_(decay).add_(current.detach(), alpha=1 - decay)
        # Batch-norm statistics are not weights: the average takes the model's current ones.
        for kept, now in zip(self.model.buffers(), model.buffers(), strict=True):
            kept.copy_(now)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue the average."""
        return {"steps": self.steps, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue an average saved by `state_dict`."""
        self.steps = int(state["steps"])
        self.model.load_state_dict(state["model"])


def _flip_some(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # A mirrored or upside-down non-digit is still one: free variety for the negatives.
    flips = torch.rand((2, images.shape[0], 1, 1, 1), generator=generator) < 0.5
    images = torch.where(flips[0], images.flip(-1), images)
    return torch.where(flips[1], images.flip(-2), images)


def _some_shown_as(inputs: torch.Tensor, renders: torch.Tensor, share: float, batch: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """`inputs` (the digits `batch` [B]) with each digit replaced, with probability `share`, by one of its
    renders [V, N, 1, 28, 28] drawn at random."""
    shown = torch.rand((batch.shape[0], 1, 1, 1), generator=generator) < share
    variant = torch.randint(0, renders.shape[0], (batch.shape[0],), generator=generator)
    return torch.where(shown, renders[variant, batch], inputs)


def train_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: TrainingSet,
    config: TrainConfig,
    generator: torch.Generator,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None,
    epoch: int,
    ema: Ema | None = None,
    teachers: Sequence[torch.nn.Module] = (),
    description: str = "",
) -> tuple[float, float]:
    """One pass over the shuffled digits; returns (mean loss, accuracy) on the augmented digit batches."""
    model.train()
    count = data.images.shape[0]
    order = torch.randperm(count, generator=generator)
    steps = math.ceil(count / config.batch_size)
    bar = tqdm(range(steps), desc=description, unit="batch", leave=False, disable=None if config.progress else True)
    loss_sum, correct, seen = 0.0, 0, 0
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, epoch, step / steps)
        batch = order[step * config.batch_size:(step + 1) * config.batch_size]
        inputs, target = data.images[batch], data.labels[batch]
        if data.variants is not None:
            inputs = _some_shown_as(inputs, data.variants, config.client_style, batch, generator)
        if data.neighboured is not None:
            inputs = _some_shown_as(inputs, data.neighboured, config.neighbours, batch, generator)
        digits = batch.shape[0]
        if data.negatives is not None:
            pick = torch.randint(0, data.negatives.shape[0], (config.oe_batch,), generator=generator)
            inputs = torch.cat([inputs, _flip_some(data.negatives[pick], generator)])
        if augment is not None:
            inputs = augment(inputs, generator)
        logits = model(inputs)
        loss = F.cross_entropy(logits[:digits], target, label_smoothing=config.label_smoothing)
        if teachers:
            loss = (1 - config.distill_weight) * loss + config.distill_weight * _distillation(
                logits[:digits], inputs[:digits], teachers, config.distill_temperature)
        if data.negatives is not None:
            # Cross-entropy to the uniform distribution (Hendrycks et al. 2019): the mean -log p over classes.
            loss = loss - config.oe_weight * F.log_softmax(logits[digits:], dim=1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update(model)
        loss_sum += float(loss.detach()) * digits
        correct += int((logits[:digits].argmax(1) == target).sum())
        seen += digits
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
    return loss_sum / seen, correct / seen


def _distillation(student: torch.Tensor, inputs: torch.Tensor, teachers: Sequence[torch.nn.Module],
                  temperature: float) -> torch.Tensor:
    """KL(teachers' mean tempered distribution || student's), times T^2 (Hinton et al. 2015)."""
    with torch.no_grad():
        target = torch.stack([torch.softmax(t(inputs) / temperature, dim=1) for t in teachers]).mean(0)
    log_student = F.log_softmax(student / temperature, dim=1)
    return F.kl_div(log_student, target, reduction="batchmean") * temperature**2


@torch.no_grad()
def logits_of(model: torch.nn.Module, inputs: torch.Tensor, batch: int = 1024) -> np.ndarray:
    """float32 [N, 10] logits of `model` in eval mode."""
    model.eval()
    if not inputs.shape[0]:
        return np.zeros((0, 10), np.float32)
    return torch.cat([model(inputs[i:i + batch]) for i in range(0, inputs.shape[0], batch)]).numpy()


def new_model(config: TrainConfig, seed: int, architecture: str | None = None) -> tuple[
        torch.nn.Module, torch.optim.Optimizer, torch.Generator, Ema | None]:
    """A freshly initialised LeNet-5 (or the teacher network `architecture`) from `seed`, its optimizer,
    random generator and EMA."""
    torch.manual_seed(seed)
    model = (lenet5(config.deskew, config.dropout) if architecture is None
             else teacher_model(architecture, config.deskew, config.dropout))
    optimizer = (torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
                 if config.weight_decay > 0 else torch.optim.Adam(model.parameters(), lr=config.lr))
    ema = Ema(model, config.ema_decay) if config.ema_decay > 0 else None
    return model, optimizer, torch.Generator().manual_seed(seed), ema


def fit(config: TrainConfig, data: TrainingSet, seed: int, teachers: Sequence[torch.nn.Module] = (),
        log: Callable[[str], None] | None = None, name: str = "",
        architecture: str | None = None) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    """Train one model (LeNet-5, or the teacher network `architecture`) for `config.epochs` epochs, no
    validation; returns the model to use (the EMA when on) and one record per epoch."""
    model, optimizer, generator, ema = new_model(config, seed, architecture)
    augment = build_augment(config)
    history = []
    for epoch in range(1, config.epochs + 1):
        tick = time.perf_counter()
        loss, accuracy = train_epoch(model, optimizer, data, config, generator, augment, epoch, ema, teachers,
                                     f"{name} epoch {epoch}/{config.epochs}")
        history.append({"epoch": epoch, "train_loss": loss, "train_acc": accuracy,
                        "seconds": round(time.perf_counter() - tick, 3)})
        if log is not None and (epoch == config.epochs or epoch % 10 == 0):
            log(f"{name} epoch {epoch}/{config.epochs}  loss {loss:.4f}  acc {accuracy:.4f}")
    return (ema.model if ema is not None else model).eval(), history
