"""Batch normalisation on TensorFlow's fused kernel (Ioffe & Szegedy 2015)."""

from __future__ import annotations

import contextlib

import keras

_USE_FUSED = [True]


@contextlib.contextmanager
def unfused_batch_norm():
    """Within this block, BatchNorm layers traced anew take Keras's unfused path."""
    _USE_FUSED.append(False)
    try:
        yield
    finally:
        _USE_FUSED.pop()


@keras.saving.register_keras_serializable(package="spinenet_tf")
class BatchNorm(keras.layers.BatchNormalization):
    """keras.layers.BatchNormalization, computed by tf.nn.fused_batch_norm where it can be.

    Keras 3 normalises with separate moments / multiply / add ops. TensorFlow's fused kernel
    is one op, and on CPU and GPU Grappler folds an inference-mode fused batch norm (and the
    activation after it) into the preceding convolution, which the unfused form prevents.
    Same variables, same statistics (the moving variance is the biased batch variance, as in
    Keras). Synchronised batch norm, renorm, masks, non-4-D inputs and other backends take
    Keras's own path, as do bfloat16 inputs.
    """

    def _fusable(self, inputs, mask) -> bool:
        return (
            _USE_FUSED[-1]
            and keras.backend.backend() == "tensorflow"
            and mask is None
            and not self.synchronized
            and not self.renorm
            and self.scale
            and self.center
            and len(inputs.shape) == 4
            and self.axis in (-1, 3)
            and inputs.shape[-1] is not None
            # bfloat16 (TPUs, mixed_bfloat16 on CPU) is faster on Keras's path: the CPU fused
            # kernel has no fast bfloat16 version, and XLA fuses either form.
            and keras.backend.standardize_dtype(inputs.dtype) in ("float32", "float16")
            # The fused kernel rejects smaller epsilons.
            and self.epsilon >= 1.001e-5
        )

    def call(self, inputs, training=None, mask=None):
        if not self._fusable(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        x = inputs
        gamma = tf.convert_to_tensor(self.gamma)
        beta = tf.convert_to_tensor(self.beta)
        if training and self.trainable:
            y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta, epsilon=self.epsilon, is_training=True
            )[:3]
            # The fused op returns the Bessel-corrected variance; Keras keeps the biased one.
            shape = tf.shape(x)
            n = tf.cast(shape[0] * shape[1] * shape[2], tf.float32)
            variance = variance * ((n - 1.0) / tf.maximum(n, 1.0))
            momentum = self.momentum
            self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
            self.moving_variance.assign(
                self.moving_variance * momentum + variance * (1.0 - momentum)
            )
        else:
            y = tf.compat.v1.nn.fused_batch_norm(
                x,
                gamma,
                beta,
                mean=tf.convert_to_tensor(self.moving_mean),
                variance=tf.convert_to_tensor(self.moving_variance),
                epsilon=self.epsilon,
                is_training=False,
            )[0]
        return tf.cast(y, self.compute_dtype)
