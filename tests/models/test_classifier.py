import keras
import numpy as np
import pytest
import tensorflow as tf

from spinenet_tf.models.classifier import ClassificationHead, Classifier, build_classifier
from spinenet_tf.tools.summary import count_multiply_adds, count_parameters
from tests.conftest import FIVE_BLOCKS, LARGE_IDS, TINY

# Trainable parameters with 1001 classes: the backbone (= Model Garden's) + C * 1001 + 1001,
# C = 256 (512 for 190); the paper: 22.1M / 36.5M / 60.5M / 127.1M.
PARAMS_1001 = {"49": 22_088_745, "96": 36_520_233, "143": 60_504_873, "190": 127_101_177}
# Multiply-adds at 224 px (the paper: 3.5 / 5.7 / 9.1 / 19.1 B): our backbones' 640-1280 px
# figures scaled by area. The profiler count (convolutions, batch norm, adds, activations)
# comes within 1% of them.
GMACS_224 = {"49": 3.49, "96": 5.74, "143": 9.10, "190": 19.11}


def _sweep(ids):
    return [
        pytest.param(m, marks=pytest.mark.slow) if m in LARGE_IDS or m == "96" else m for m in ids
    ]


@pytest.mark.parametrize("model_id", _sweep(PARAMS_1001))
def test_parameters_and_multiply_adds_at_224_match_the_paper(model_id):
    model = build_classifier(model_id, num_classes=1001, image_size=224)
    assert count_parameters(model) == PARAMS_1001[model_id]
    gmacs = count_multiply_adds(model, (224, 224)) / 1e9
    assert gmacs == pytest.approx(GMACS_224[model_id], rel=0.01)


def test_levels_at_224_and_the_reference_recipe():
    model = build_classifier("49", num_classes=10, image_size=224)
    sizes = [tuple(t.shape[1:3]) for t in model.backbone.outputs]
    assert sizes == [(28, 28), (14, 14), (7, 7), (4, 4), (2, 2)]  # ceil(224 / 2**level)
    # tensorflow/tpu: 15 searched blocks, block i dropped at 0.2 * (i + 1) / 15.
    assert len(model.backbone.block_specs) == 15
    rates = [
        model.backbone.get_layer(f"block{i}_0").get_config()["stochastic_depth_rate"]
        for i in (0, 14)
    ]
    assert rates == pytest.approx([0.2 / 15, 0.2])
    bn = model.backbone.get_layer("stem_bn")
    assert (bn.momentum, bn.epsilon) == (0.9, 1e-5)
    assert model.backbone.activation == "swish"
    dense = model.head.dense
    assert dense.bias_initializer.__class__.__name__ == "Zeros"
    assert dense.kernel_initializer.stddev == 0.01


def test_aggregation_follows_tf1_nearest_resize_including_4_to_7():
    # At 224 px P6 is 4x4 and P5 7x7: TF1 resize_nearest_neighbor (tensorflow/tpu's) picks
    # rows 0,0,1,1,2,2,3; TF2's half-pixel resize would pick 0,0,1,2,2,3,3.
    rng = np.random.default_rng(0)
    sizes = {3: 28, 4: 14, 5: 7, 6: 4, 7: 2}
    features = {
        f"P{lvl}": tf.constant(rng.normal(size=(2, n, n, 3)), tf.float32)
        for lvl, n in sizes.items()
    }
    head = ClassificationHead(4)
    ours = head.aggregate(features)
    expected = features["P7"]
    for level in (6, 5, 4, 3):
        size = sizes[level]
        expected = (
            tf.compat.v1.image.resize_nearest_neighbor(expected, [size, size])
            + features[f"P{level}"]
        )
    np.testing.assert_allclose(ours.numpy(), (expected / 5.0).numpy(), rtol=0, atol=1e-6)
    rows = tf.compat.v1.image.resize_nearest_neighbor(
        tf.reshape(tf.range(4.0), (1, 4, 1, 1)), [7, 1]
    )
    assert rows.numpy().ravel().tolist() == [0, 0, 1, 1, 2, 2, 3]
    top = ClassificationHead(4, aggregation="top")
    assert top.aggregate(features) is features["P7"]


def _tiny(num_classes=4, image_size=64, **kwargs):
    return build_classifier("49S", num_classes, image_size, **{**TINY, **kwargs})


def test_label_smoothed_loss_is_tensorflow_tpus():
    model = _tiny(num_classes=5)
    logits = np.random.default_rng(1).normal(size=(3, 5)).astype("float32")
    labels = np.array([1, 4, 0])
    ours = model.loss_from(labels, logits).numpy()
    targets = np.eye(5)[labels] * 0.9 + 0.1 / 5
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(ours, -(targets * log_p).sum(-1), rtol=1e-5)


def test_fit_predict_and_config_round_trip():
    keras.utils.set_random_seed(0)
    model = _tiny(num_classes=3, dropout_rate=0.1, **FIVE_BLOCKS)
    rng = np.random.default_rng(2)
    images = rng.normal(size=(8, 64, 64, 3)).astype("float32")
    labels = np.array([0, 1, 2, 1, 0, 2, 1, 0])
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    history = model.fit(images, labels, batch_size=8, epochs=8, verbose=0).history["loss"]
    assert history[-1] < history[0]
    out = model.predict(images[:2], verbose=0)
    assert {k: v.shape for k, v in out.items()} == {
        "probabilities": (2, 3),
        "top_k_classes": (2, 3),
        "top_k_scores": (2, 3),
    }
    np.testing.assert_allclose(out["probabilities"].sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(out["top_k_classes"][:, 0], out["probabilities"].argmax(-1))

    clone = Classifier.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(clone(images[:2]), model(images[:2]), rtol=1e-5, atol=1e-5)

    # A loss of one's own replaces the built-in one.
    own = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer="sgd", loss=own)
    logits = model(images, training=False)
    decay = float(np.sum([float(x) for x in model.losses]))
    expected = float(own(labels, logits)) + decay
    assert float(model.compute_loss(images, labels, logits)) == pytest.approx(expected, rel=1e-5)


def test_unknown_settings_are_named():
    with pytest.raises(ValueError, match="unknown model setting.*'anchor'"):
        build_classifier("49S", 4, 64, anchor={})
    with pytest.raises(ValueError, match="aggregation 'mean'"):
        _tiny(aggregation="mean")
