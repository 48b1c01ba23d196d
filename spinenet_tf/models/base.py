"""What the task models (RetinaNet, MaskRCNN, Classifier) share: a SpineNet backbone and heads
wired on a fixed input size, serialised as their constructor's arguments."""

from __future__ import annotations

import inspect

import keras
from keras import ops


def as_dataclass(cls, value, **defaults):
    """value if it is a cls already, else cls(**defaults, **value) (value a dict or None)."""
    if isinstance(value, cls):
        return value
    return cls(**{**defaults, **(value or {})})


def backbone_anchors(backbone, anchor, **defaults):
    """The AnchorConfig of a detector on `backbone` (anchor: a config, a dict of fields or
    None, over `defaults` and the backbone's levels); its levels must be the backbone's."""
    from spinenet_tf.ops.anchors import AnchorConfig

    levels = dict(min_level=backbone.min_level, max_level=backbone.max_level)
    anchor = as_dataclass(AnchorConfig, anchor, **{**defaults, **levels})
    if (anchor.min_level, anchor.max_level) != tuple(levels.values()):
        raise ValueError(
            f"anchor levels {anchor.min_level}-{anchor.max_level} differ from the "
            f"backbone's {backbone.min_level}-{backbone.max_level}"
        )
    return anchor


def flatten_levels(per_level: dict, channels: int):
    """[B, H, W, A * C] per level -> [B, sum(H * W * A), C], in anchor order."""
    flat = []
    for key in sorted(per_level, key=lambda k: int(k[1:])):
        x = per_level[key]
        h, w, c = x.shape[1:]
        flat.append(ops.reshape(x, (-1, h * w * (c // channels), channels)))
    return ops.concatenate(flat, axis=1)


def image_hw(image_size) -> tuple[int, int]:
    """N or (height, width) -> (height, width), checked."""
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"image_size {image_size!r} must be N or (height, width)")
    return int(hw[0]), int(hw[1])


def split_overrides(overrides: dict, model_cls, weight_decay: float) -> tuple[dict, dict]:
    """A builder's overrides split into (model_cls arguments, backbone arguments), the name
    of the model included in the first. Kernels get L2(weight_decay / 2), whose gradient is
    weight_decay * w (Model Garden's l2(weight_decay / 2)), unless `kernel_regularizer` is
    given. Unknown names raise, listing what each side takes."""
    from spinenet_tf.models.spinenet import BACKBONE_ARGS

    overrides = dict(overrides)
    if weight_decay:
        overrides.setdefault("kernel_regularizer", keras.regularizers.L2(weight_decay / 2))
    own = set(inspect.signature(model_cls.__init__).parameters) - {
        "self",
        "kwargs",
        "backbone",
        "num_classes",
        "image_size",
    }
    model_args = {k: overrides.pop(k) for k in list(overrides) if k in own | {"name"}}
    unknown = sorted(set(overrides) - BACKBONE_ARGS)
    if unknown:
        raise ValueError(
            f"unknown model setting(s) {unknown}; {model_cls.__name__} takes {sorted(own)} "
            f"and the backbone {sorted(BACKBONE_ARGS)}"
        )
    return model_args, overrides


class BackboneModel:
    """What the task models share, beside keras.Model: they keep their constructor's
    arguments but the backbone in `self._model_config` (get_config adds `self.backbone`,
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


class BackboneAndHead(BackboneModel, keras.Model):
    """A functional model of `self.backbone` and a head (RetinaNet, Classifier).

    The first functional build of a keras.Model subclass rewrites the bases of its classes,
    this one included, from keras.Model to Functional (Keras's
    inject_functional_model_class), so a model built by subclassing (MaskRCNN) takes
    BackboneModel beside keras.Model instead: as a subclass of this class it would fail in
    any process that had built a RetinaNet first."""
