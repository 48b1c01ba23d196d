"""SGD and Adam: gradient clipping on the global gradient, the same on 1 or 2 replicas; SGD's
momentum update as one fused op, Adam's equal to Keras's."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from spinenet_tf.training.config import OptimizerConfig
from spinenet_tf.training.optimizers import SGD, Adam


def _train_step(strategy, parts, cls=SGD, **kwargs):
    with strategy.scope():
        w = keras.Variable(np.zeros(3, "float32"))
        optimizer = cls(learning_rate=1.0, **kwargs)
        optimizer.build([w])

    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(x * w)
        optimizer.apply(tape.gradient(loss, [w]), [w])

    @tf.function
    def run():
        inputs = strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(parts[ctx.replica_id_in_sync_group])
        )
        strategy.run(step, args=(inputs,))

    run()
    return w.numpy()


def test_global_clipnorm_clips_the_all_reduced_gradient(mirrored):
    # The global gradient is (3, 4, 0), of norm 5: clipped to norm 1 it is (0.6, 0.8, 0).
    # Clipping each replica's share first, as Keras does, would give (1, 1, 0).
    parts = [np.array([[3.0, 0.0, 0.0]], "float32"), np.array([[0.0, 4.0, 0.0]], "float32")]
    one = _train_step(tf.distribute.get_strategy(), [np.concatenate(parts)], global_clipnorm=1.0)
    two = _train_step(mirrored, parts, global_clipnorm=1.0)
    np.testing.assert_allclose(one, [-0.6, -0.8, 0.0], rtol=1e-6)
    np.testing.assert_allclose(two, one, rtol=1e-6)
    unclipped = _train_step(mirrored, parts)
    np.testing.assert_allclose(unclipped, [-3.0, -4.0, 0.0])
    config = SGD(learning_rate=0.1, global_clipnorm=2.0).get_config()
    assert SGD.from_config(config).global_clipnorm_after_reduce == 2.0
    with pytest.raises(ValueError, match="only global_clipnorm"):
        SGD(clipnorm=1.0)


def test_adam_clips_the_all_reduced_gradient_and_updates_as_keras(mirrored):
    # Adam's first step is lr * sqrt(1 - b2) * m / ((1 - b1) * (sqrt(v) + eps)) with m, v the
    # (1 - b)-weighted gradient and its square: with eps = 1e6 >> |g| it is -sqrt(1e-3) * g /
    # 1e6, proportional to the clipped gradient (0.6, 0.8, 0), not to the raw (3, 4, 0).
    parts = [np.array([[3.0, 0.0, 0.0]], "float32"), np.array([[0.0, 4.0, 0.0]], "float32")]
    kwargs = dict(cls=Adam, epsilon=1e6, global_clipnorm=1.0)
    one = _train_step(tf.distribute.get_strategy(), [np.concatenate(parts)], **kwargs)
    two = _train_step(mirrored, parts, **kwargs)
    np.testing.assert_allclose(one, -np.sqrt(1e-3) * np.array([0.6, 0.8, 0.0]) / 1e6, rtol=1e-4)
    np.testing.assert_allclose(two, one, rtol=1e-6)
    config = Adam(global_clipnorm=2.0).get_config()
    assert Adam.from_config(config).global_clipnorm_after_reduce == 2.0

    w0, keras_adam, ours = _keras_and_ours(keras.optimizers.Adam, Adam, learning_rate=0.01)
    assert np.max(np.abs(ours - w0)) > 0.01
    np.testing.assert_array_equal(ours, keras_adam)


def _keras_and_ours(keras_cls, our_cls, **kwargs):
    """Initial weights and the weights after 6 XLA-compiled steps of each optimizer on the
    same random gradients."""
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(4, 3)).astype("float32")
    grads = rng.normal(size=(6, 4, 3)).astype("float32")
    results = []
    for cls in (keras_cls, our_cls):
        w = keras.Variable(w0)
        optimizer = cls(**kwargs)
        step = tf.function(lambda g: optimizer.apply([g], [w]), jit_compile=True)  # noqa: B023
        for g in grads:
            step(tf.constant(g))
        results.append(w.numpy())
    return w0, *results


@pytest.mark.parametrize("nesterov", [False, True])
def test_fused_momentum_update_equals_keras_sgd(nesterov):
    rate = keras.optimizers.schedules.PolynomialDecay(0.1, 6, 0.01)  # changes every step
    w0, *results = _keras_and_ours(
        keras.optimizers.SGD, SGD, learning_rate=rate, momentum=0.9, nesterov=nesterov
    )
    assert np.max(np.abs(results[1] - w0)) > 0.1
    # Keras's Nesterov step rounds (m * momentum) and (lr * g) separately; the fused kernel
    # may contract them.
    np.testing.assert_allclose(results[1], results[0], rtol=0, atol=0 if not nesterov else 1e-6)


def test_an_unknown_optimizer_name_is_refused():
    with pytest.raises(ValueError, match=r"OptimizerConfig.name 'adamw' is not one of"):
        OptimizerConfig(name="adamw")
