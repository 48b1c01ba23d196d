"""SpineNet building blocks as Keras 3 layers."""

from spinenet_tf.layers.blocks import BottleneckBlock, MBConvBlock, ResidualBlock
from spinenet_tf.layers.common import ConvSettings, StochasticDepth
from spinenet_tf.layers.norm import BatchNorm
from spinenet_tf.layers.resample import Fusion, MobileResample, Resample

__all__ = [
    "BatchNorm",
    "BottleneckBlock",
    "ConvSettings",
    "Fusion",
    "MBConvBlock",
    "MobileResample",
    "Resample",
    "ResidualBlock",
    "StochasticDepth",
]
