import keras
import numpy as np
import pytest
import tensorflow as tf

from spinenet_tf import layers
from spinenet_tf.layers.common import ConvSettings, nearest_upsample

SETTINGS = ConvSettings(kernel_regularizer=keras.regularizers.L2(4e-5), norm_momentum=0.9)


@pytest.mark.parametrize(
    "layer, in_channels, out_channels, strides",
    [
        (layers.ResidualBlock(8, use_projection=True, settings=SETTINGS), 4, 8, 1),
        (layers.ResidualBlock(8, strides=2, use_projection=True), 8, 8, 2),
        (layers.BottleneckBlock(8, use_projection=True, settings=SETTINGS), 4, 32, 1),
        (layers.BottleneckBlock(8), 32, 32, 1),
        (layers.MBConvBlock(8, in_filters=8, stochastic_depth_rate=0.5), 8, 8, 1),
        (layers.MBConvBlock(12, in_filters=8, strides=2, se_ratio=0.0), 8, 12, 2),
    ],
)
def test_blocks_shapes_and_config_round_trip(layer, in_channels, out_channels, strides):
    x = np.random.default_rng(0).normal(size=(2, 9, 7, in_channels)).astype("float32")
    y = layer(x)
    assert tuple(y.shape) == (2, -(-9 // strides), -(-7 // strides), out_channels)
    clone = layer.__class__.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    clone(x)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(clone(x), y, rtol=1e-6, atol=1e-6)


def test_conv_settings_apply_everywhere_and_serialise():
    block = layers.BottleneckBlock(4, use_projection=True, settings=SETTINGS)
    block(np.zeros((1, 4, 4, 8), "float32"))
    bns = [block.bn1, block.bn2, block.bn3, block.shortcut_bn]
    assert all(bn.momentum == 0.9 for bn in bns)
    assert len(block.losses) == 4  # one L2 term per conv kernel
    assert ConvSettings.from_any(SETTINGS.to_config()) == SETTINGS
    with pytest.raises(ValueError, match="norm_momentum 1.5"):
        ConvSettings(norm_momentum=1.5)


def test_stochastic_depth_drops_whole_examples_and_keeps_the_mean():
    layer = layers.StochasticDepth(0.5, seed=1)
    x = np.ones((2000, 2, 2, 3), "float32")
    assert np.array_equal(layer(x, training=False), x)
    y = np.asarray(layer(x, training=True))
    per_example = y.reshape(2000, -1)
    assert set(np.unique(per_example)) == {0.0, 2.0}
    assert np.all(per_example.min(axis=1) == per_example.max(axis=1))
    assert abs(y.mean() - 1.0) < 0.1


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_stochastic_depth_keep_rate_is_exact_in_float32_noise(policy):
    keras.config.set_dtype_policy(policy)
    layer = layers.StochasticDepth(0.0375, seed=2)
    x = np.ones((16000, 1, 1, 1), "float32")
    kept = [np.mean(np.asarray(layer(x, training=True), np.float32) > 0) for _ in range(25)]
    # 400,000 draws: the standard error of the rate is 3e-4. bfloat16 noise keeps 0.9607.
    assert abs(np.mean(kept) - 0.9625) < 0.001


def test_stochastic_depth_draws_independent_masks_per_replica(mirrored):
    with mirrored.scope():
        layer = layers.StochasticDepth(0.5, seed=3)

    @tf.function
    def masks():
        return mirrored.run(lambda: layer(tf.ones((64, 1, 1, 1)), training=True)[:, 0, 0, 0])

    draws = [[m.numpy() for m in mirrored.experimental_local_results(masks())] for _ in range(3)]
    for first, second in draws:
        assert not np.array_equal(first, second)
    assert not np.array_equal(draws[0][0], draws[1][0])  # and new masks at every call
    kept = np.mean([d > 0 for pair in draws for d in pair])
    assert abs(kept - 0.5) < 0.1


def test_nearest_upsample_golden_and_crop():
    x = np.arange(6, dtype="float32").reshape(1, 2, 3, 1)
    y = np.asarray(nearest_upsample(x, 2))[0, :, :, 0]
    np.testing.assert_array_equal(
        y, [[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2], [3, 3, 4, 4, 5, 5], [3, 3, 4, 4, 5, 5]]
    )
    cropped = nearest_upsample(x, 4, target_hw=(7, 11))
    assert tuple(cropped.shape) == (1, 7, 11, 1)


def test_nearest_upsample_has_an_xla_gradient():
    @tf.function(jit_compile=True)
    def grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = nearest_upsample(x, 4, target_hw=(6, 7))
            loss = tf.reduce_sum(y * y)
        return tape.gradient(loss, x)

    g = grad(tf.ones((1, 2, 2, 3)))
    # Each input pixel is copied to the pixels of the 6x7 crop that it covers.
    np.testing.assert_array_equal(g[0, :, :, 0], [[32, 24], [16, 12]])


def test_resample_up_and_down_to_ceil_sizes():
    image = keras.Input((333, 500, 3))
    feats = keras.Input((11, 16, 8))  # level 5
    up = layers.Resample(5, 3, 32, filters=4)([feats, image])
    down = layers.Resample(5, 7, 32, filters=4)([feats, image])
    mobile_up = layers.MobileResample(5, 3, 16)([feats, image])
    mobile_down = layers.MobileResample(5, 7, 16)([feats, image])
    assert tuple(up.shape) == (None, 42, 63, 32)
    assert tuple(down.shape) == (None, 3, 4, 32)
    assert tuple(mobile_up.shape) == (None, 42, 63, 16)
    assert tuple(mobile_down.shape) == (None, 3, 4, 16)
    model = keras.Model([feats, image], [up, down, mobile_up, mobile_down])
    outs = model([np.ones((1, 11, 16, 8), "float32"), np.ones((1, 333, 500, 3), "float32")])
    assert [tuple(o.shape[1:3]) for o in outs] == [(42, 63), (3, 4), (42, 63), (3, 4)]


def test_weighted_fusion_normalises_non_negative_weights():
    fusion = layers.Fusion(3, weighted=True, activation="relu")
    parts = [np.full((1, 2, 2, 1), v, "float32") for v in (1.0, 2.0, 4.0)]
    np.testing.assert_allclose(fusion(parts), np.full((1, 2, 2, 1), 7 / 3), rtol=1e-3)
    fusion.fusion_weights.assign([2.0, -5.0, 2.0])  # the negative weight is clamped to 0
    np.testing.assert_allclose(fusion(parts), np.full((1, 2, 2, 1), 2.5), rtol=1e-3)
    plain = layers.Fusion(3)
    np.testing.assert_allclose(plain(parts), np.full((1, 2, 2, 1), 7.0))
    assert not plain.weights
    with pytest.raises(ValueError, match="expected 3 inputs, got 2"):
        layers.Fusion(3)(parts[:2])


@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16"])
def test_fused_batch_norm_matches_keras_batch_norm(dtype):
    keras.config.set_dtype_policy(dtype)
    x = np.random.default_rng(0).normal(2.0, 3.0, (4, 5, 6, 8)).astype("float32")
    ours, ref = layers.BatchNorm(momentum=0.9), keras.layers.BatchNormalization(momentum=0.9)
    ours.build(x.shape)
    ref.build(x.shape)
    rng = np.random.default_rng(1)
    weights = [
        rng.uniform(0.5, 1.5, 8),
        rng.normal(size=8),
        rng.normal(size=8),
        rng.uniform(0.5, 2.0, 8),
    ]
    ours.set_weights(weights)
    ref.set_weights(weights)
    tol = 1e-5 if dtype == "float32" else 3e-2
    np.testing.assert_allclose(ours(x, training=False), ref(x, training=False), rtol=tol, atol=tol)
    np.testing.assert_allclose(ours(x, training=True), ref(x, training=True), rtol=tol, atol=tol)
    # Moving statistics follow Keras's update, biased batch variance included.
    for a, b in zip(ours.get_weights(), ref.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4 if dtype == "float32" else 2e-2, atol=1e-5)


def test_fused_batch_norm_trains_under_xla_and_falls_back_when_it_must():
    bn = layers.BatchNorm()
    bn.build((2, 4, 4, 3))

    @tf.function(jit_compile=True)
    def grads(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(bn(x, training=True) ** 3)
        return tape.gradient(loss, bn.trainable_variables)

    g = grads(tf.random.normal((2, 4, 4, 3)))
    assert all(np.all(np.isfinite(v)) for v in g)
    # 2-D inputs and tiny epsilons are outside the fused kernel's domain.
    assert tuple(layers.BatchNorm()(np.ones((3, 5), "float32")).shape) == (3, 5)
    y = layers.BatchNorm(epsilon=1e-6)(np.ones((1, 2, 2, 3), "float32"), training=True)
    np.testing.assert_allclose(y, 0.0, atol=1e-6)
