"""Learning-rate schedules of the paper's recipe: linear warm-up, then step decay or cosine."""

from __future__ import annotations

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="spinenet_tf")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from warmup_learning_rate to learning_rate over warmup_steps, then either
    steps ('step': multiplied by each of `multipliers` from the matching fraction of
    total_steps on; the paper's x0.1 and x0.01 near the end) or a cosine decay to zero."""

    def __init__(
        self,
        learning_rate: float,
        total_steps: int,
        warmup_steps: int = 0,
        warmup_learning_rate: float = 0.0,
        decay: str = "step",
        boundaries=(0.9, 0.97),
        multipliers=(0.1, 0.01),
    ):
        if decay not in ("step", "cosine"):
            raise ValueError(f"unknown decay '{decay}'; expected 'step' or 'cosine'")
        if len(boundaries) != len(multipliers):
            raise ValueError(
                f"boundaries {boundaries} and multipliers {multipliers} differ in length"
            )
        self.learning_rate = float(learning_rate)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.warmup_learning_rate = float(warmup_learning_rate)
        self.decay = decay
        self.boundaries = tuple(float(b) for b in boundaries)
        self.multipliers = tuple(float(m) for m in multipliers)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        lr = self.learning_rate
        if self.decay == "cosine":
            span = max(self.total_steps - self.warmup_steps, 1)
            progress = ops.clip((step - self.warmup_steps) / span, 0.0, 1.0)
            value = 0.5 * lr * (1.0 + ops.cos(math.pi * progress))
        else:
            value = ops.convert_to_tensor(lr, "float32")
            for boundary, multiplier in zip(self.boundaries, self.multipliers, strict=True):
                value = ops.where(step >= boundary * self.total_steps, lr * multiplier, value)
        if self.warmup_steps:
            warm = self.warmup_learning_rate + (lr - self.warmup_learning_rate) * (
                step / self.warmup_steps
            )
            value = ops.where(step < self.warmup_steps, warm, value)
        return value

    def get_config(self):
        return {
            "learning_rate": self.learning_rate,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "warmup_learning_rate": self.warmup_learning_rate,
            "decay": self.decay,
            "boundaries": list(self.boundaries),
            "multipliers": list(self.multipliers),
        }
