"""Shared conv / norm settings, activations, stochastic depth and nearest upsampling."""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
import tensorflow as tf
from keras import ops

from spinenet_tf.layers.norm import BatchNorm

ACTIVATIONS = ("relu", "swish", "hard_swish")


def get_activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}")
    # hard_swish: x * relu6(x + 3) / 6, Model Garden's SpineNet-Mobile 49S / 49 configs.
    return keras.activations.get({"swish": "silu", "hard_swish": "hard_silu"}.get(name, name))


def hard_sigmoid(x):
    # Model Garden's SE gate in SpineNet-Mobile: relu6(x + 3) / 6.
    return ops.relu6(x + 3.0) / 6.0


@dataclasses.dataclass(frozen=True)
class ConvSettings:
    """Everything every conv and batch norm in the network shares, passed once.

    `kernel_initializer` and `kernel_regularizer` are kept in serialised form so the object is
    plain data and round-trips through get_config.
    """

    kernel_initializer: Any = "VarianceScaling"
    kernel_regularizer: Any = None
    norm_momentum: float = 0.99
    norm_epsilon: float = 1e-3
    use_sync_bn: bool = False

    def __post_init__(self):
        reg = self.kernel_regularizer
        if reg is not None and not isinstance(reg, (dict, str)):
            object.__setattr__(self, "kernel_regularizer", keras.regularizers.serialize(reg))
        init = self.kernel_initializer
        if not isinstance(init, (dict, str)):
            object.__setattr__(self, "kernel_initializer", keras.initializers.serialize(init))
        if not 0.0 <= self.norm_momentum < 1.0:
            raise ValueError(f"norm_momentum {self.norm_momentum} must be in [0, 1)")
        if self.norm_epsilon <= 0:
            raise ValueError(f"norm_epsilon {self.norm_epsilon} must be > 0")

    @classmethod
    def from_any(cls, value: ConvSettings | dict | None) -> ConvSettings:
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        return cls(**value)

    def to_config(self) -> dict:
        return dataclasses.asdict(self)

    def _initializer(self):
        # A fresh instance per layer: Keras 3 warns when one seeded instance is reused.
        init = self.kernel_initializer
        return keras.initializers.get(dict(init) if isinstance(init, dict) else init)

    def regularizer(self):
        reg = self.kernel_regularizer
        return (
            None
            if reg is None
            else keras.regularizers.get(dict(reg) if isinstance(reg, dict) else reg)
        )

    def conv(
        self,
        filters: int,
        kernel_size: int,
        strides: int = 1,
        use_bias: bool = False,
        name: str | None = None,
    ) -> keras.layers.Conv2D:
        return keras.layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding="same",
            use_bias=use_bias,
            kernel_initializer=self._initializer(),
            kernel_regularizer=self.regularizer(),
            name=name,
        )

    def depthwise_conv(
        self, kernel_size: int, strides: int = 1, name: str | None = None
    ) -> keras.layers.DepthwiseConv2D:
        # As in Model Garden, depthwise kernels are not regularised.
        return keras.layers.DepthwiseConv2D(
            kernel_size,
            strides=strides,
            padding="same",
            use_bias=False,
            depthwise_initializer=self._initializer(),
            name=name,
        )

    def norm(self, name: str | None = None) -> keras.layers.BatchNormalization:
        return BatchNorm(
            momentum=self.norm_momentum,
            epsilon=self.norm_epsilon,
            synchronized=self.use_sync_bn,
            name=name,
        )


class StochasticDepth(keras.layers.Layer):
    """Drops the residual branch per example with probability `rate` (Huang et al. 2016).

    Each replica draws its own masks: the seed generator's state is mirrored across replicas,
    so the replica id is folded into each draw (otherwise every replica would drop the same
    blocks of the same examples, and a pod of R replicas would make 1/R of the independent
    decisions). The noise is float32 whatever the compute dtype: bfloat16 uniforms are too
    coarse for an exact keep rate.
    """

    def __init__(self, rate: float = 0.0, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"stochastic depth rate {rate} must be in [0, 1)")
        self.rate = float(rate)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed) if rate > 0 else None
        # No weights: built from the start, also when a block never calls it (MBConv blocks
        # without a residual connection).
        self.built = True

    def call(self, x, training=None):
        if not training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (ops.shape(x)[0],) + (1,) * (len(x.shape) - 1)
        seed = tf.cast(self.seed_generator.next(), tf.int64)
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            seed = tf.random.experimental.stateless_fold_in(seed, context.replica_id_in_sync_group)
        noise = tf.random.stateless_uniform(shape, seed, dtype=tf.float32)
        mask = ops.cast(ops.floor(keep + noise) / keep, x.dtype)
        return x * mask

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


def nearest_upsample(x, scale: int, target_hw=None):
    """Nearest-neighbour upsampling by an integer factor via reshape + a broadcasting
    multiply by ones.

    tf.image.resize(method="nearest") has no XLA gradient; this has. The multiply (as Model
    Garden's nearest_upsampling) rather than broadcast_to: TFLite's BROADCAST_TO is not
    delegated to XNNPACK and splits the graph (measured: mobile-49XS at 256 px, 14.3 ms
    against 11.8 ms per image). When `target_hw` is
    given, the result is cropped to it: levels are ceil(size / 2**level), so upsampling
    ceil(size / 2**l) by 2**k can overshoot ceil(size / 2**(l-k)) by up to 2**k - 1 rows.
    """
    if scale == 1:
        return x
    shape_hw = x.shape[1:3]
    shape = ops.shape(x)
    b, h, w, c = shape[0], shape[1], shape[2], x.shape[-1]
    x = ops.reshape(x, (b, h, 1, w, 1, c)) * ops.ones((1, 1, scale, 1, scale, 1), x.dtype)
    x = ops.reshape(x, (b, h * scale, w * scale, c))
    if target_hw is not None:
        static = [None if d is None else d * scale for d in shape_hw]
        known = all(isinstance(t, int) for t in target_hw)
        if not (known and list(target_hw) == static):  # a no-op slice still copies on CPU
            x = x[:, : target_hw[0], : target_hw[1], :]
    return x
