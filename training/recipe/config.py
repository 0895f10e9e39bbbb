"""Every setting of a training run, and the learning-rate schedules.

`TrainConfig`'s defaults are the plain recipe of the first shipped model (they keep short test runs
quick); the `digits train` command line defaults to the shipped recipe (`training.cli`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from training.data import SPLIT_SEED

CHECKPOINT_FORMAT = 1
TEACHER_MODELS = ("lenet5", "wide")
"""What `--teacher-model` may name: LeNet-5 itself, or `training.model.WideTeacher`."""
PARITY_DIGITS = 256
"""Real digits kept in a checkpoint for the export's ONNX-vs-PyTorch check."""
LR_SCHEDULES = ("cosine", "constant", "onecycle")
ONECYCLE_WARMUP = 0.3  # share of the run spent rising to the peak (torch's OneCycleLR default)
ONECYCLE_START = 25.0  # peak / start (torch's div_factor)
ONECYCLE_END = 1e4  # start / end (torch's final_div_factor)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a run; stored in the checkpoint as plain values."""

    data_dir: Path
    out_dir: Path
    epochs: int = 40
    seed: int = 1
    augment: bool = True
    lr: float = 1e-3
    """Adam's learning rate: the start for cosine, the fixed value for constant, the peak for onecycle."""
    lr_schedule: str = "cosine"
    batch_size: int = 128
    val_size: int = 1000
    test_size: int = 1000
    split_seed: int = SPLIT_SEED
    resume: Path | None = None
    threads: int = 0
    """torch CPU threads; 0 = every CPU this process may use."""
    command: str = ""
    """The `digits train ...` line that started the run, recorded in the exported model."""
    progress: bool = True
    """Show the tqdm bar (it hides itself anyway when stderr is not a terminal)."""
    # --- augmentation (training.augment.AffineAugment) ---
    rotation_deg: float = 10.0
    scale: float = 0.1
    """Scale factor drawn from [1 - scale, 1 + scale]."""
    shear: float = 0.0
    shift_px: float = 2.0
    elastic_alpha: float = 0.0
    elastic_sigma: float = 4.0
    elastic_probability: float = 0.5
    deskew: bool = False
    """Put the parameter-free `training.model.Deskew` in front of the network (in the exported graph too)."""
    # --- loss and weights ---
    dropout: float = 0.0
    """Dropout after each hidden dense layer while training (0: off)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) per step, times the learning rate (0: plain Adam)."""
    label_smoothing: float = 0.0
    ema_decay: float = 0.0
    """Exponential moving average of the weights per step (0: off); the average is what is evaluated."""
    # --- serving-style positives and outlier exposure (training.synth) ---
    client_style: float = 0.0
    """Share of training digits shown as a client would send them, through the server's recipe."""
    client_variants: int = 2
    """Client-style renders made per training digit (drawn from at random each time)."""
    neighbours: float = 0.0
    """Share of training digits shown with a sliver of a touching neighbour's ink (`training.synth.neighbours`)."""
    neighbour_variants: int = 2
    """Neighbour renders made per training digit."""
    oe_weight: float = 0.0
    """Weight of the outlier-exposure loss (cross-entropy to the uniform distribution on negatives)."""
    oe_per_digit: float = 3.0
    """Generated negatives in the pool, per training digit."""
    oe_batch: int = 64
    """Negatives in every batch (next to `batch_size` digits)."""
    # --- distillation ---
    teachers: int = 0
    """LeNet-5 teachers trained first (other seeds, same digits, same recipe); 0: no distillation."""
    distill_weight: float = 0.5
    """Share of the digit loss that is the KL divergence to the teachers' mean (tempered) output."""
    distill_temperature: float = 2.0
    teacher_model: str = "lenet5"
    """The teachers' network (`training.model.TEACHER_MODELS`): LeNet-5, or the larger `WideTeacher`."""
    teacher_epochs: int = 0
    """Epochs of each teacher's own training (0: `epochs`)."""
    teachers_from: tuple[str, ...] = ()
    """Run directories of earlier `digits train --cv` runs on the same split and folds: their models of
    the same name (fold-k, final) teach too (an experiment's shortcut: no teachers to train again)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain values (paths as strings), for checkpoints and reports."""
        return {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
                for k, v in asdict(self).items()}

    def recipe(self) -> dict[str, Any]:
        """Only the settings that change the model (no paths, no bookkeeping)."""
        skip = {"data_dir", "out_dir", "resume", "threads", "command", "progress", "val_size", "test_size"}
        return {k: v for k, v in self.to_dict().items() if k not in skip}


def teacher_config(config: TrainConfig) -> TrainConfig:
    """The recipe a teacher trains with: the student's, with the teacher's epochs and no teachers of its own."""
    return replace(config, epochs=config.teacher_epochs or config.epochs, teachers=0, teachers_from=())


def learning_rate(config: TrainConfig, epoch: int, fraction: float = 0.0) -> float:
    """Learning rate at `fraction` (0..1) through 1-based `epoch`.

    cosine: 1e-3 decayed to 0 over the run, per epoch; constant: fixed; onecycle: per step, a cosine rise
    from lr/25 to lr over the first 30 % of the run, then a cosine fall to lr/250,000 (torch's OneCycleLR).
    """
    if config.lr_schedule == "constant":
        return config.lr
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / config.epochs))
    t = (epoch - 1 + fraction) / config.epochs
    start, end = config.lr / ONECYCLE_START, config.lr / ONECYCLE_START / ONECYCLE_END
    if t < ONECYCLE_WARMUP:
        return start + (config.lr - start) * 0.5 * (1 - math.cos(math.pi * t / ONECYCLE_WARMUP))
    return end + (config.lr - end) * 0.5 * (1 + math.cos(math.pi * (t - ONECYCLE_WARMUP) / (1 - ONECYCLE_WARMUP)))
