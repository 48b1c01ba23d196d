"""Checkpoint conversion from TF Model Garden."""

from spinenet_tf.convert.model_garden import from_model_garden

__all__ = ["from_model_garden"]
