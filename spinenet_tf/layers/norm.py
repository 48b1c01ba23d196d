"""Batch normalisation (Ioffe & Szegedy 2015) that gives the same run on any replica count."""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

_USE_FUSED = [True]


@contextlib.contextmanager
def unfused_batch_norm():
    """Within this block, BatchNorm layers traced anew take the unfused path."""
    _USE_FUSED.append(False)
    try:
        yield
    finally:
        _USE_FUSED.pop()


def num_replicas() -> int:
    """Replicas of the enclosing replica context; 1 outside one."""
    context = tf.distribute.get_replica_context()
    return context.num_replicas_in_sync if context is not None else 1


@keras.saving.register_keras_serializable(package="spinenet_tf")
class BatchNorm(keras.layers.BatchNormalization):
    """keras.layers.BatchNormalization with exact statistics across replicas, computed by
    tf.nn.fused_batch_norm where it can be.

    Same variables and arguments as Keras's layer (the moving variance is the biased batch
    variance, as in Keras). Three differences, all in training mode:

    - Synchronised statistics are two-pass: the all-reduced mean, then the all-reduced sum of
      squared deviations. Keras computes E[x^2] - E[x]^2, which cancels catastrophically for
      channels whose mean is large against their spread. With one replica, synchronised batch
      norm is plain batch norm (and takes the fused kernel).
    - Without synchronisation, each replica normalises with its own statistics, but the
      moving statistics are updated with their mean over replicas, so every replica's copy
      stays the same (tf.keras kept them as ON_READ MEAN variables; Keras 3 lets each replica
      overwrite its own copy, and a checkpoint then saves replica 0's).
    - Float32 and float16 inputs take TensorFlow's fused kernel: one op, which Grappler folds
      into the preceding convolution at inference on CPU and GPU. bfloat16 inputs (TPUs,
      mixed_bfloat16) take the unfused form, which XLA fuses as well and which is faster on
      CPU, whose fused kernel has no fast bfloat16 version.
    """

    def _fusable(self, inputs) -> bool:
        return (
            _USE_FUSED[-1]
            and self.scale
            and self.center
            and len(inputs.shape) == 4
            and inputs.shape[-1] is not None
            and keras.backend.standardize_dtype(inputs.dtype) in ("float32", "float16")
            # The fused kernel rejects smaller epsilons.
            and self.epsilon >= 1.001e-5
        )

    def call(self, inputs, training=None, mask=None):
        channels_last = self.axis in (-1, len(inputs.shape) - 1)
        if mask is not None or self.renorm or not channels_last:
            return super().call(inputs, training=training, mask=mask)
        if not (training and self.trainable):
            if not self._fusable(inputs):
                return super().call(inputs, training=False)
            y = tf.compat.v1.nn.fused_batch_norm(
                inputs,
                tf.convert_to_tensor(self.gamma),
                tf.convert_to_tensor(self.beta),
                mean=tf.convert_to_tensor(self.moving_mean),
                variance=tf.convert_to_tensor(self.moving_variance),
                epsilon=self.epsilon,
                is_training=False,
            )[0]
            return tf.cast(y, self.compute_dtype)

        replicas = num_replicas()
        if self._fusable(inputs) and not (self.synchronized and replicas > 1):
            y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                inputs,
                tf.convert_to_tensor(self.gamma),
                tf.convert_to_tensor(self.beta),
                epsilon=self.epsilon,
                is_training=True,
            )[:3]
            # The fused op returns the Bessel-corrected variance; Keras keeps the biased one.
            n = tf.cast(tf.size(inputs) // inputs.shape[-1], tf.float32)
            variance = variance * ((n - 1.0) / tf.maximum(n, 1.0))
        else:
            x = tf.cast(inputs, tf.float32)
            mean, variance = self._moments_exact(x, replicas if self.synchronized else 1)
            y = tf.nn.batch_normalization(
                x,
                mean,
                variance,
                tf.cast(self.beta, tf.float32) if self.center else None,
                tf.cast(self.gamma, tf.float32) if self.scale else None,
                self.epsilon,
            )
        if replicas > 1 and not self.synchronized:
            mean, variance = _replica_mean([mean, variance])
        momentum = self.momentum
        self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
        self.moving_variance.assign(self.moving_variance * momentum + variance * (1.0 - momentum))
        return tf.cast(y, self.compute_dtype)

    def _moments_exact(self, x, replicas: int):
        """Mean and biased variance over every axis but the last, two-pass, over all
        `replicas` (all-reduced when > 1; the all-reduce's gradient is an all-reduce too)."""
        axes = list(range(len(x.shape) - 1))
        if replicas == 1:
            return tf.nn.moments(x, axes)
        context = tf.distribute.get_replica_context()
        count = tf.cast(tf.size(x) // tf.shape(x)[-1], tf.float32)
        totals = context.all_reduce(
            tf.distribute.ReduceOp.SUM, tf.concat([tf.reduce_sum(x, axes), count[None]], 0)
        )
        mean = totals[:-1] / totals[-1]
        squares = tf.reduce_sum(tf.math.squared_difference(x, mean), axes)
        return mean, context.all_reduce(tf.distribute.ReduceOp.SUM, squares) / totals[-1]


def _replica_mean(tensors):
    """The mean over replicas of each tensor (one all-reduce), without a gradient."""
    sizes = [t.shape[0] for t in tensors]
    flat = tf.stop_gradient(tf.concat(tensors, 0))
    mean = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.MEAN, flat)
    return tf.split(mean, sizes)
