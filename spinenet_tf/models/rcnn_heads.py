"""Mask R-CNN heads (He et al. 2017): the RPN, the box head and the mask head, with batch
norm in every head as in SpineNet's Mask R-CNN (tensorflow/tpu, Model Garden).

Each head builds its weights from shapes alone (`build`), so a model can count and load its
parameters without running a forward pass.
"""

from __future__ import annotations

import keras
from keras import ops

from spinenet_tf.layers.common import ConvSettings, get_activation

# Model Garden's initialisers for the ROI heads (VarianceScaling fan-out convolutions, a
# uniform FC, small normal predictors).
_CONV_INIT = dict(
    class_name="VarianceScaling",
    config=dict(scale=2.0, mode="fan_out", distribution="untruncated_normal"),
)
_FC_INIT = dict(
    class_name="VarianceScaling", config=dict(scale=1 / 3, mode="fan_out", distribution="uniform")
)


def _normal(stddev):
    return dict(class_name="RandomNormal", config=dict(stddev=stddev))


class _Head(keras.layers.Layer):
    """What the three heads share: settings, activation, validated sizes, config."""

    def __init__(self, num_convs, num_filters, activation, settings, **kwargs):
        super().__init__(**kwargs)
        if num_convs < 0 or num_filters < 1:
            raise ValueError(
                f"{self.name}: num_convs ({num_convs}) must be >= 0 and num_filters "
                f"({num_filters}) >= 1"
            )
        self.num_convs, self.num_filters = int(num_convs), int(num_filters)
        self.activation = activation
        self.act = get_activation(activation)
        self.settings = ConvSettings.from_any(settings)

    def _layer(self, cls, units, init, name, **kwargs):
        return cls(
            units,
            kernel_initializer=keras.initializers.get(dict(init, config=dict(init["config"]))),
            kernel_regularizer=self.settings.regularizer(),
            name=name,
            **kwargs,
        )

    def _conv(self, filters, kernel, init, name, **kwargs):
        return self._layer(
            keras.layers.Conv2D, filters, init, name, kernel_size=kernel, padding="same", **kwargs
        )

    def _tower(self, x, convs, norms, training):
        for conv, norm in zip(convs, norms, strict=True):
            x = self.act(norm(conv(x), training=training))
        return x

    def get_config(self):
        return {
            **super().get_config(),
            "num_convs": self.num_convs,
            "num_filters": self.num_filters,
            "activation": self.activation,
            "settings": self.settings.to_config(),
        }


@keras.saving.register_keras_serializable(package="spinenet_tf")
class RPNHead(_Head):
    """Region proposal network: `num_convs` 3x3 convs (with bias) shared across levels, a
    batch norm per level, then 1x1 objectness (A) and box (4 A) predictors; all kernels
    N(0, 0.01) as in tensorflow/tpu. Takes {"P{level}": features}; returns (scores, deltas),
    dicts of [B, H_l, W_l, A] and [B, H_l, W_l, 4 A]."""

    def __init__(
        self,
        num_anchors: int,
        min_level: int = 3,
        max_level: int = 7,
        num_convs: int = 1,
        num_filters: int = 256,
        activation: str = "relu",
        settings: ConvSettings | dict | None = None,
        **kwargs,
    ):
        super().__init__(num_convs, num_filters, activation, settings, **kwargs)
        self.num_anchors = int(num_anchors)
        self.min_level, self.max_level = int(min_level), int(max_level)
        self.levels = range(self.min_level, self.max_level + 1)
        init = _normal(0.01)
        self.convs = [self._conv(num_filters, 3, init, f"conv{i}") for i in range(num_convs)]
        self.norms = [
            [self.settings.norm(f"norm_P{level}_{i}") for i in range(num_convs)]
            for level in self.levels
        ]
        self.scores = self._conv(num_anchors, 1, init, "scores")
        self.boxes = self._conv(4 * num_anchors, 1, init, "boxes")

    def build(self, input_shapes):
        channels = input_shapes[f"P{self.min_level}"][-1]
        for conv in self.convs:
            conv.build((None, None, None, channels))
            channels = self.num_filters
        for norm in (n for level in self.norms for n in level):
            norm.build((None, None, None, self.num_filters))
        self.scores.build((None, None, None, channels))
        self.boxes.build((None, None, None, channels))

    def call(self, features, training=None):
        scores, deltas = {}, {}
        for norms, level in zip(self.norms, self.levels, strict=True):
            x = self._tower(features[f"P{level}"], self.convs, norms, training)
            scores[f"P{level}"], deltas[f"P{level}"] = self.scores(x), self.boxes(x)
        return scores, deltas

    def get_config(self):
        return {
            **super().get_config(),
            "num_anchors": self.num_anchors,
            "min_level": self.min_level,
            "max_level": self.max_level,
        }


@keras.saving.register_keras_serializable(package="spinenet_tf")
class BoxHead(_Head):
    """Fast R-CNN head: `num_convs` 3x3 convs + BN + activation on each ROI's features, one
    FC of `fc_dims` + BN + activation, then class logits (K) and class-specific box deltas
    (4 K). Takes [B, R, S, S, C]; returns ([B, R, K], [B, R, 4 K])."""

    def __init__(
        self,
        num_classes: int,
        num_convs: int = 4,
        num_filters: int = 256,
        fc_dims: int = 1024,
        activation: str = "relu",
        settings: ConvSettings | dict | None = None,
        **kwargs,
    ):
        super().__init__(num_convs, num_filters, activation, settings, **kwargs)
        if num_classes < 2 or fc_dims < 1:
            raise ValueError(
                f"{self.name}: num_classes {num_classes} must be >= 2 (with "
                f"background) and fc_dims {fc_dims} >= 1"
            )
        self.num_classes, self.fc_dims = int(num_classes), int(fc_dims)
        self.convs = [self._conv(num_filters, 3, _CONV_INIT, f"conv{i}") for i in range(num_convs)]
        self.norms = [self.settings.norm(f"norm{i}") for i in range(num_convs)]
        self.fc = self._layer(keras.layers.Dense, fc_dims, _FC_INIT, "fc")
        self.fc_norm = self.settings.norm("fc_norm")
        self.classifier = self._layer(keras.layers.Dense, num_classes, _normal(0.01), "classes")
        self.box_predictor = self._layer(
            keras.layers.Dense, 4 * num_classes, _normal(0.001), "boxes"
        )

    def build(self, input_shape):
        *_, size, _, channels = input_shape
        for conv, norm in zip(self.convs, self.norms, strict=True):
            conv.build((None, size, size, channels))
            channels = self.num_filters
            norm.build((None, size, size, channels))
        self.fc.build((None, size * size * channels))
        self.fc_norm.build((None, self.fc_dims))
        self.classifier.build((None, self.fc_dims))
        self.box_predictor.build((None, self.fc_dims))

    def call(self, roi_features, training=None):
        _, num_rois, size, _, channels = roi_features.shape
        x = ops.reshape(roi_features, (-1, size, size, channels))
        x = self._tower(x, self.convs, self.norms, training)
        x = ops.reshape(x, (-1, size * size * x.shape[-1]))
        x = self.act(self.fc_norm(self.fc(x), training=training))
        classes = ops.reshape(self.classifier(x), (-1, num_rois, self.num_classes))
        boxes = ops.reshape(self.box_predictor(x), (-1, num_rois, 4 * self.num_classes))
        return classes, boxes

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "fc_dims": self.fc_dims}


@keras.saving.register_keras_serializable(package="spinenet_tf")
class MaskHead(_Head):
    """Mask head: `num_convs` 3x3 convs + BN + activation, a 2x2 stride-2 transposed conv +
    BN + activation, a 1x1 conv to one mask per class, of which each ROI keeps its class's.
    Takes ([B, R, S, S, C], classes [B, R]); returns logits [B, R, 2 S, 2 S]."""

    def __init__(
        self,
        num_classes: int,
        num_convs: int = 4,
        num_filters: int = 256,
        activation: str = "relu",
        settings: ConvSettings | dict | None = None,
        **kwargs,
    ):
        super().__init__(num_convs, num_filters, activation, settings, **kwargs)
        self.num_classes = int(num_classes)
        self.convs = [self._conv(num_filters, 3, _CONV_INIT, f"conv{i}") for i in range(num_convs)]
        self.norms = [self.settings.norm(f"norm{i}") for i in range(num_convs)]
        self.upsample = self._layer(
            keras.layers.Conv2DTranspose,
            num_filters,
            _CONV_INIT,
            "upsample",
            kernel_size=2,
            strides=2,
        )
        self.upsample_norm = self.settings.norm("upsample_norm")
        self.logits = self._conv(num_classes, 1, _CONV_INIT, "logits")

    def build(self, input_shape):
        *_, size, _, channels = input_shape[0]
        for conv, norm in zip(self.convs, self.norms, strict=True):
            conv.build((None, size, size, channels))
            channels = self.num_filters
            norm.build((None, size, size, channels))
        self.upsample.build((None, size, size, channels))
        self.upsample_norm.build((None, 2 * size, 2 * size, self.num_filters))
        self.logits.build((None, 2 * size, 2 * size, self.num_filters))

    def call(self, inputs, training=None):
        roi_features, classes = inputs
        _, num_rois, size, _, channels = roi_features.shape
        x = ops.reshape(roi_features, (-1, size, size, channels))
        x = self._tower(x, self.convs, self.norms, training)
        x = self.act(self.upsample_norm(self.upsample(x), training=training))
        logits = ops.reshape(self.logits(x), (-1, num_rois, 2 * size, 2 * size, self.num_classes))
        # The ROI's class by a one-hot contraction rather than a gather (XLA, TPUs).
        pick = ops.one_hot(ops.cast(classes, "int32"), self.num_classes, dtype=logits.dtype)
        return ops.einsum("brhwc,brc->brhw", logits, pick)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}
