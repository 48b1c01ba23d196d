"""BatchNorm: Keras's statistics, fused where it can be, and the same on 1 or 2 replicas."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from spinenet_tf import layers


def _run_replicas(strategy, layer, parts):
    """Trains `layer` on one part per replica; returns outputs, gradients and the moving
    statistics of every replica's copy."""

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y**3 * tf.range(1.0, 1.0 + y.shape[-1]))
        gx, *gw = tape.gradient(loss, [x, *layer.trainable_variables])
        context = tf.distribute.get_replica_context()
        return y, gx, context.all_reduce(tf.distribute.ReduceOp.SUM, gw)

    @tf.function
    def run():
        inputs = strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(parts[ctx.replica_id_in_sync_group])
        )
        return strategy.run(step, args=(inputs,))

    y, gx, gw = run()
    local = strategy.experimental_local_results
    stats = [
        [v.numpy() for v in local(var.value)] for var in (layer.moving_mean, layer.moving_variance)
    ]
    return (
        np.concatenate(local(y)),
        np.concatenate(local(gx)),
        [g.numpy() for g in local(gw)[0]],
        stats,
    )


@pytest.mark.parametrize("synchronized", [True, False])
def test_batch_norm_on_two_replicas(synchronized, mirrored):
    """Synchronised: equal to one replica on the whole batch (outputs, gradients, moving
    statistics). Not synchronised: each replica normalises alone, and the moving statistics
    are the mean of the replicas' updates, the same in every replica's copy."""
    rng = np.random.default_rng(0)
    # A large mean against the spread: E[x^2] - E[x]^2 loses most digits here.
    x = rng.normal(300.0, 0.5, (4, 3, 3, 5)).astype("float32")
    parts = [x[:2], x[2:]]
    with mirrored.scope():
        two = layers.BatchNorm(momentum=0.5, synchronized=synchronized)
        two.build(x.shape)
    y2, gx2, gw2, stats2 = _run_replicas(mirrored, two, parts)
    for copies in stats2:  # every replica holds the same statistics
        np.testing.assert_array_equal(copies[0], copies[1])

    one = layers.BatchNorm(momentum=0.5, synchronized=synchronized)
    one.build(x.shape)
    default = tf.distribute.get_strategy()
    if synchronized:
        y1, gx1, gw1, stats1 = _run_replicas(default, one, [x])
        np.testing.assert_allclose(y2, y1, rtol=1e-4, atol=1e-4)
        # x itself carries float32 rounding of 3e-5 against a spread of 0.5: the normalised
        # values agree to about 1e-4, and sums of their cubes to about 1e-3.
        np.testing.assert_allclose(gx2, gx1, atol=1e-4 * np.abs(gx1).max())
        for a, b in zip(gw2, gw1, strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-3)
        expected_mean, expected_var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    else:
        halves = [_run_replicas(default, _copy(one), [p]) for p in parts]
        np.testing.assert_allclose(y2, np.concatenate([h[0] for h in halves]), atol=1e-5)
        expected_mean = np.mean([p.mean((0, 1, 2)) for p in parts], 0)
        expected_var = np.mean([p.var((0, 1, 2)) for p in parts], 0)
    np.testing.assert_allclose(stats2[0][0], 0.5 * expected_mean, rtol=1e-6)
    np.testing.assert_allclose(stats2[1][0], 0.5 + 0.5 * expected_var, rtol=1e-5)


def _copy(layer):
    new = layers.BatchNorm.from_config(layer.get_config())
    new.build((None, 3, 3, 5))
    new.set_weights(layer.get_weights())
    return new


def test_synchronised_batch_norm_on_one_replica_is_the_fused_kernel():
    x = np.random.default_rng(1).normal(2.0, 3.0, (4, 5, 6, 8)).astype("float32")
    sync, plain = layers.BatchNorm(synchronized=True), keras.layers.BatchNormalization()
    np.testing.assert_allclose(sync(x, training=True), plain(x, training=True), atol=1e-5)
    graph = tf.function(lambda v: sync(v, training=True)).get_concrete_function(
        tf.TensorSpec(x.shape)
    )
    ops = {op.type for op in graph.graph.get_operations()}
    assert "FusedBatchNormV3" in ops and "CollectiveReduceV2" not in ops
