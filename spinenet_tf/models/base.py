"""What the task models (RetinaNet, Classifier) share: a SpineNet backbone and a head wired
on a fixed input size, serialised as their constructor's arguments."""

from __future__ import annotations

import keras
from keras import ops


def image_hw(image_size) -> tuple[int, int]:
    """N or (height, width) -> (height, width), checked."""
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"image_size {image_size!r} must be N or (height, width)")
    return int(hw[0]), int(hw[1])


class BackboneAndHead(keras.Model):
    """A functional model of `self.backbone` and a head. Subclasses keep their constructor's
    arguments but the backbone in `self._model_config` (get_config adds the backbone,
    serialised) and turn raw outputs into predictions in `postprocess` (model.predict)."""

    _model_config: dict

    def postprocess(self, outputs):
        return outputs

    def predict_step(self, data):
        x = data[0] if isinstance(data, (tuple, list)) else data
        return self.postprocess(self(x, training=False))

    def with_weight_decay(self, loss):
        """loss plus the kernel regularisers' weight decay (model.losses)."""
        if self.losses:
            loss = loss + ops.cast(ops.sum(self.losses), loss.dtype)
        return loss

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            **self._model_config,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)
