"""Residual, bottleneck and MBConv blocks (He et al. 2016; Sandler et al. 2018; SpineNet Sec. 3)."""

from __future__ import annotations

import keras
from keras import ops

from spinenet_tf.layers.common import ConvSettings, StochasticDepth, get_activation, hard_sigmoid


class _Block(keras.layers.Layer):
    """Shared arguments and config of the three block types."""

    def __init__(
        self,
        filters: int,
        strides: int = 1,
        use_projection: bool = False,
        stochastic_depth_rate: float = 0.0,
        activation: str = "relu",
        settings: ConvSettings | dict | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if filters < 1:
            raise ValueError(f"{self.name}: filters must be >= 1, got {filters}")
        if strides not in (1, 2):
            raise ValueError(f"{self.name}: strides must be 1 or 2, got {strides}")
        self.filters = int(filters)
        self.strides = int(strides)
        self.use_projection = bool(use_projection)
        self.stochastic_depth_rate = float(stochastic_depth_rate or 0.0)
        self.activation = activation
        self.act = get_activation(activation)
        self.settings = ConvSettings.from_any(settings)
        self.drop = StochasticDepth(self.stochastic_depth_rate, name="stochastic_depth")

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "strides": self.strides,
            "use_projection": self.use_projection,
            "stochastic_depth_rate": self.stochastic_depth_rate,
            "activation": self.activation,
            "settings": self.settings.to_config(),
        }


@keras.saving.register_keras_serializable(package="spinenet_tf")
class ResidualBlock(_Block):
    """Two 3x3 convs; output width `filters`."""

    def __init__(self, filters, **kwargs):
        super().__init__(filters, **kwargs)
        s = self.settings
        if self.use_projection:
            self.shortcut_conv = s.conv(self.filters, 1, self.strides, name="shortcut_conv")
            self.shortcut_bn = s.norm("shortcut_bn")
        self.conv1 = s.conv(self.filters, 3, self.strides, name="conv1")
        self.bn1 = s.norm("bn1")
        self.conv2 = s.conv(self.filters, 3, name="conv2")
        self.bn2 = s.norm("bn2")

    def call(self, inputs, training=None):
        shortcut = inputs
        if self.use_projection:
            shortcut = self.shortcut_bn(self.shortcut_conv(inputs), training=training)
        x = self.act(self.bn1(self.conv1(inputs), training=training))
        x = self.bn2(self.conv2(x), training=training)
        return self.act(self.drop(x, training=training) + shortcut)

    def compute_output_shape(self, input_shape):
        return _strided(input_shape, self.strides, self.filters)


@keras.saving.register_keras_serializable(package="spinenet_tf")
class BottleneckBlock(_Block):
    """1x1 -> 3x3 -> 1x1 convs; output width 4 * `filters`."""

    expansion = 4

    def __init__(self, filters, **kwargs):
        super().__init__(filters, **kwargs)
        s, out = self.settings, self.filters * self.expansion
        if self.use_projection:
            self.shortcut_conv = s.conv(out, 1, self.strides, name="shortcut_conv")
            self.shortcut_bn = s.norm("shortcut_bn")
        self.conv1 = s.conv(self.filters, 1, name="conv1")
        self.bn1 = s.norm("bn1")
        self.conv2 = s.conv(self.filters, 3, self.strides, name="conv2")
        self.bn2 = s.norm("bn2")
        self.conv3 = s.conv(out, 1, name="conv3")
        self.bn3 = s.norm("bn3")

    def call(self, inputs, training=None):
        shortcut = inputs
        if self.use_projection:
            shortcut = self.shortcut_bn(self.shortcut_conv(inputs), training=training)
        x = self.act(self.bn1(self.conv1(inputs), training=training))
        x = self.act(self.bn2(self.conv2(x), training=training))
        x = self.bn3(self.conv3(x), training=training)
        return self.act(self.drop(x, training=training) + shortcut)

    def compute_output_shape(self, input_shape):
        return _strided(input_shape, self.strides, self.filters * self.expansion)


@keras.saving.register_keras_serializable(package="spinenet_tf")
class MBConvBlock(_Block):
    """Inverted bottleneck with squeeze-excite (SpineNet-Mobile); output width `filters`."""

    def __init__(
        self, filters, in_filters: int, expand_ratio: int = 6, se_ratio: float = 0.2, **kwargs
    ):
        super().__init__(filters, **kwargs)
        if in_filters < 1 or expand_ratio < 1:
            raise ValueError(
                f"{self.name}: in_filters ({in_filters}) and expand_ratio ({expand_ratio}) "
                "must be >= 1"
            )
        if not 0.0 <= se_ratio <= 1.0:
            raise ValueError(f"{self.name}: se_ratio {se_ratio} must be in [0, 1]")
        self.in_filters = int(in_filters)
        self.expand_ratio = int(expand_ratio)
        self.se_ratio = float(se_ratio)
        s, expanded = self.settings, self.in_filters * self.expand_ratio
        if self.expand_ratio > 1:
            self.expand_conv = s.conv(expanded, 1, name="expand_conv")
            self.expand_bn = s.norm("expand_bn")
        self.depthwise = s.depthwise_conv(3, self.strides, name="depthwise")
        self.depthwise_bn = s.norm("depthwise_bn")
        if self.se_ratio > 0:
            # Squeeze width from the block's input width, as in Model Garden.
            squeezed = max(1, int(self.in_filters * self.se_ratio))
            self.se_reduce = s.conv(squeezed, 1, use_bias=True, name="se_reduce")
            self.se_expand = s.conv(expanded, 1, use_bias=True, name="se_expand")
        self.project_conv = s.conv(self.filters, 1, name="project_conv")
        self.project_bn = s.norm("project_bn")
        self.use_residual = self.in_filters == self.filters and self.strides == 1

    def call(self, inputs, training=None):
        x = inputs
        if self.expand_ratio > 1:
            x = self.act(self.expand_bn(self.expand_conv(x), training=training))
        x = self.act(self.depthwise_bn(self.depthwise(x), training=training))
        if self.se_ratio > 0:
            squeeze = ops.mean(x, axis=(1, 2), keepdims=True)
            squeeze = ops.relu(self.se_reduce(squeeze))
            x = x * hard_sigmoid(self.se_expand(squeeze))
        x = self.project_bn(self.project_conv(x), training=training)
        if self.use_residual:
            x = self.drop(x, training=training) + inputs
        return x

    def compute_output_shape(self, input_shape):
        return _strided(input_shape, self.strides, self.filters)

    def get_config(self):
        return {
            **super().get_config(),
            "in_filters": self.in_filters,
            "expand_ratio": self.expand_ratio,
            "se_ratio": self.se_ratio,
        }


def _strided(input_shape, strides, channels):
    def down(d):
        return None if d is None else (d + strides - 1) // strides

    return (input_shape[0], down(input_shape[1]), down(input_shape[2]), channels)


BLOCKS = {"residual": ResidualBlock, "bottleneck": BottleneckBlock, "mbconv": MBConvBlock}


def block_output_channels(block_fn: str, filters: int) -> int:
    return filters * BottleneckBlock.expansion if block_fn == "bottleneck" else filters
