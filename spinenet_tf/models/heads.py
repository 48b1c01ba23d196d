"""RetinaNet class and box subnets (Lin et al. 2017, Sec. 4 and Fig. 3)."""

from __future__ import annotations

import math

import keras

from spinenet_tf.layers.common import ConvSettings, get_activation


@keras.saving.register_keras_serializable(package="spinenet_tf")
class RetinaNetHead(keras.layers.Layer):
    """Class and box subnets whose convolutions are shared across levels.

    Each subnet is `num_convs` 3x3 convs (with bias) + batch norm + activation, the batch
    norms kept per level as in Model Garden's SpineNet configs, then a 3x3 predictor. The
    classifier's bias starts at -log((1 - prior) / prior) so every anchor starts with
    probability `prior_prob` (focal loss paper, Sec. 4.1).

    Takes a dict {"P{level}": features}; returns (class_logits, box_deltas), dicts of
    [batch, H_l, W_l, A * num_classes] and [batch, H_l, W_l, A * 4].
    """

    def __init__(
        self,
        num_classes: int,
        num_anchors: int,
        min_level: int = 3,
        max_level: int = 7,
        num_convs: int = 4,
        num_filters: int = 256,
        use_separable_conv: bool = False,
        activation: str = "swish",
        prior_prob: float = 0.01,
        settings: ConvSettings | dict | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_classes < 1 or num_anchors < 1 or num_convs < 0 or num_filters < 1:
            raise ValueError(
                f"{self.name}: num_classes ({num_classes}), num_anchors ({num_anchors}), "
                f"num_filters ({num_filters}) must be >= 1 and num_convs ({num_convs}) >= 0"
            )
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"{self.name}: prior_prob {prior_prob} must be in (0, 1)")
        self.num_classes = int(num_classes)
        self.num_anchors = int(num_anchors)
        self.min_level, self.max_level = int(min_level), int(max_level)
        self.num_convs = int(num_convs)
        self.num_filters = int(num_filters)
        self.use_separable_conv = bool(use_separable_conv)
        self.activation = activation
        self.act = get_activation(activation)
        self.prior_prob = float(prior_prob)
        self.settings = ConvSettings.from_any(settings)
        levels = range(self.min_level, self.max_level + 1)

        bias_prior = -math.log((1.0 - self.prior_prob) / self.prior_prob)
        self.cls_convs = [self._conv(num_filters, 0.01, f"cls_conv{i}") for i in range(num_convs)]
        self.cls_norms = [
            [self.settings.norm(f"cls_norm_P{lvl}_{i}") for i in range(num_convs)] for lvl in levels
        ]
        self.classifier = self._conv(num_anchors * num_classes, 1e-5, "classifier", bias_prior)
        self.box_convs = [self._conv(num_filters, 0.01, f"box_conv{i}") for i in range(num_convs)]
        self.box_norms = [
            [self.settings.norm(f"box_norm_P{lvl}_{i}") for i in range(num_convs)] for lvl in levels
        ]
        self.box_predictor = self._conv(num_anchors * 4, 1e-5, "box_predictor")

    def _conv(self, filters, stddev, name, bias=0.0):
        bias_init = keras.initializers.Constant(bias)
        if self.use_separable_conv:
            # As Model Garden's RetinaNetHead: the predictors' separable kernels are drawn
            # from N(0, 0.03) and regularised; the towers' keep Keras's defaults (Glorot
            # uniform, no regulariser).
            predictor = name in ("classifier", "box_predictor")
            kwargs = {}
            if predictor:
                kwargs = dict(
                    depthwise_initializer=keras.initializers.RandomNormal(stddev=0.03),
                    pointwise_initializer=keras.initializers.RandomNormal(stddev=0.03),
                    depthwise_regularizer=self.settings.regularizer(),
                    pointwise_regularizer=self.settings.regularizer(),
                )
            return keras.layers.SeparableConv2D(
                filters, 3, padding="same", bias_initializer=bias_init, name=name, **kwargs
            )
        return keras.layers.Conv2D(
            filters,
            3,
            padding="same",
            kernel_initializer=keras.initializers.RandomNormal(stddev=stddev),
            kernel_regularizer=self.settings.regularizer(),
            bias_initializer=bias_init,
            name=name,
        )

    def _tower(self, x, convs, norms, training):
        for conv, norm in zip(convs, norms, strict=True):
            x = self.act(norm(conv(x), training=training))
        return x

    def call(self, features, training=None):
        class_logits, box_deltas = {}, {}
        for i, level in enumerate(range(self.min_level, self.max_level + 1)):
            x = features[f"P{level}"]
            class_logits[f"P{level}"] = self.classifier(
                self._tower(x, self.cls_convs, self.cls_norms[i], training)
            )
            box_deltas[f"P{level}"] = self.box_predictor(
                self._tower(x, self.box_convs, self.box_norms[i], training)
            )
        return class_logits, box_deltas

    def call_order_layers(self) -> list:
        """Layers with weights in the order the forward pass first uses them: the shared
        convs and predictors with the first level, then each further level's norms."""

        def interleave(convs, norms):
            return [layer for pair in zip(convs, norms, strict=True) for layer in pair]

        order = interleave(self.cls_convs, self.cls_norms[0]) + [self.classifier]
        order += interleave(self.box_convs, self.box_norms[0]) + [self.box_predictor]
        for cls_norms, box_norms in zip(self.cls_norms[1:], self.box_norms[1:], strict=True):
            order += cls_norms + box_norms
        return order

    def compute_output_shape(self, input_shapes):
        def shape(key, channels):
            return (*input_shapes[key][:3], channels)

        keys = [f"P{level}" for level in range(self.min_level, self.max_level + 1)]
        return (
            {k: shape(k, self.num_anchors * self.num_classes) for k in keys},
            {k: shape(k, self.num_anchors * 4) for k in keys},
        )

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "num_anchors": self.num_anchors,
            "min_level": self.min_level,
            "max_level": self.max_level,
            "num_convs": self.num_convs,
            "num_filters": self.num_filters,
            "use_separable_conv": self.use_separable_conv,
            "activation": self.activation,
            "prior_prob": self.prior_prob,
            "settings": self.settings.to_config(),
        }
