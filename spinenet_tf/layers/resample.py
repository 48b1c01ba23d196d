"""Cross-scale resampling and parent fusion (SpineNet Sec. 3.2, Fig. 3)."""

from __future__ import annotations

import keras
from keras import ops

from spinenet_tf.layers.common import ConvSettings, get_activation, nearest_upsample
from spinenet_tf.ops.geometry import level_size


class _Resample(keras.layers.Layer):
    """Takes [features, image] and returns features at `target_level`.

    The image is only read for its size: it fixes the target size ceil(size / 2**level) when
    upsampling, so any input size works, not only multiples of 2**max_level.
    """

    def __init__(
        self,
        input_level: int,
        target_level: int,
        output_filters: int,
        activation: str = "relu",
        settings: ConvSettings | dict | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.input_level = int(input_level)
        self.target_level = int(target_level)
        self.output_filters = int(output_filters)
        self.activation = activation
        self.act = get_activation(activation)
        self.settings = ConvSettings.from_any(settings)

    def _upsample(self, x, image):
        scale = 2 ** (self.input_level - self.target_level)
        # Static sizes where the image's are known, so XLA and the no-crop check see them.
        hw = [
            s if s is not None else ops.shape(image)[i + 1] for i, s in enumerate(image.shape[1:3])
        ]
        target_hw = level_size(hw, self.target_level)
        return nearest_upsample(x, scale, target_hw)

    def compute_output_shape(self, input_shapes):
        image_shape = input_shapes[1]
        hw = level_size(image_shape[1:3], self.target_level)
        return (input_shapes[0][0], *hw, self.output_filters)

    def get_config(self):
        return {
            **super().get_config(),
            "input_level": self.input_level,
            "target_level": self.target_level,
            "output_filters": self.output_filters,
            "activation": self.activation,
            "settings": self.settings.to_config(),
        }


@keras.saving.register_keras_serializable(package="spinenet_tf")
class Resample(_Resample):
    """SpineNet resampling: 1x1 conv to alpha * C, then a stride-2 3x3 conv and max-pools down
    or nearest-neighbour up, then a 1x1 conv + BN (no activation) to the target width."""

    def __init__(self, input_level, target_level, output_filters, filters: int, **kwargs):
        super().__init__(input_level, target_level, output_filters, **kwargs)
        if filters < 1:
            raise ValueError(f"{self.name}: resample filters must be >= 1, got {filters}")
        self.filters = int(filters)
        s = self.settings
        self.reduce_conv = s.conv(self.filters, 1, name="reduce_conv")
        self.reduce_bn = s.norm("reduce_bn")
        steps = self.target_level - self.input_level
        if steps > 0:
            self.down_conv = s.conv(self.filters, 3, strides=2, name="down_conv")
            self.down_bn = s.norm("down_bn")
            # Model Garden's op order: one strided conv, then a 3x3/2 max-pool per level left.
            self.pools = [
                keras.layers.MaxPooling2D(3, 2, padding="same", name=f"pool{i}")
                for i in range(steps - 1)
            ]
        self.expand_conv = s.conv(self.output_filters, 1, name="expand_conv")
        self.expand_bn = s.norm("expand_bn")

    def call(self, inputs, training=None):
        x, image = inputs
        x = self.act(self.reduce_bn(self.reduce_conv(x), training=training))
        if self.target_level > self.input_level:
            x = self.act(self.down_bn(self.down_conv(x), training=training))
            for pool in self.pools:
                x = pool(x)
        elif self.target_level < self.input_level:
            x = self._upsample(x, image)
        return self.expand_bn(self.expand_conv(x), training=training)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


@keras.saving.register_keras_serializable(package="spinenet_tf")
class MobileResample(_Resample):
    """SpineNet-Mobile resampling: a 3x3/2 depthwise conv + BN + act per level down, or
    nearest-neighbour up, then a 1x1 conv + BN to the target width."""

    def __init__(self, input_level, target_level, output_filters, **kwargs):
        super().__init__(input_level, target_level, output_filters, **kwargs)
        s = self.settings
        steps = max(0, self.target_level - self.input_level)
        # One list in call order (conv, bn, conv, bn, ...): variables are listed in this order.
        self.down_layers = []
        for i in range(steps):
            self.down_layers += [
                s.depthwise_conv(3, 2, name=f"down{i}_depthwise"),
                s.norm(f"down{i}_bn"),
            ]
        self.expand_conv = s.conv(self.output_filters, 1, name="expand_conv")
        self.expand_bn = s.norm("expand_bn")

    def call(self, inputs, training=None):
        x, image = inputs
        for conv, bn in zip(self.down_layers[::2], self.down_layers[1::2], strict=True):
            x = self.act(bn(conv(x), training=training))
        if self.target_level < self.input_level:
            x = self._upsample(x, image)
        return self.expand_bn(self.expand_conv(x), training=training)


@keras.saving.register_keras_serializable(package="spinenet_tf")
class Fusion(keras.layers.Layer):
    """Sums the resampled parents, then applies the activation.

    With `weighted=True`, each parent gets a learned scalar w_i, kept non-negative by a ReLU
    and normalised by their sum (the paper's "weighted block fusion", after EfficientDet's
    fast normalised fusion). Model Garden accepts this option but never builds the weights.
    """

    def __init__(
        self,
        num_inputs: int,
        weighted: bool = False,
        activation: str = "relu",
        epsilon: float = 1e-4,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_inputs < 1:
            raise ValueError(f"{self.name}: num_inputs must be >= 1, got {num_inputs}")
        self.num_inputs = int(num_inputs)
        self.weighted = bool(weighted)
        self.activation = activation
        self.act = get_activation(activation)
        self.epsilon = float(epsilon)

    def build(self, input_shapes):
        if len(input_shapes) != self.num_inputs:
            raise ValueError(
                f"{self.name}: expected {self.num_inputs} inputs, got {len(input_shapes)}"
            )
        if self.weighted:
            self.fusion_weights = self.add_weight(
                name="fusion_weights", shape=(self.num_inputs,), initializer="ones"
            )

    def call(self, inputs):
        if self.weighted:
            w = ops.relu(ops.cast(self.fusion_weights, self.compute_dtype))
            w = w / (ops.sum(w) + ops.cast(self.epsilon, self.compute_dtype))
            inputs = [x * w[i] for i, x in enumerate(inputs)]
        x = inputs[0]
        for y in inputs[1:]:
            x = x + y
        return self.act(x)

    def compute_output_shape(self, input_shapes):
        return input_shapes[0]

    def get_config(self):
        return {
            **super().get_config(),
            "num_inputs": self.num_inputs,
            "weighted": self.weighted,
            "activation": self.activation,
            "epsilon": self.epsilon,
        }
