"""Fidelity: with converted weights, our backbones compute what Model Garden's compute."""

import subprocess
import sys

import numpy as np
import pytest

import spinenet_tf
from spinenet_tf.convert import from_model_garden
from tests.conftest import model_garden, randomize_batch_norm_stats, relative_max_diff

FAST_IDS = ["49S", "49", "96", "mobile-49XS", "mobile-49S", "mobile-49"]
SLOW_IDS = ["143", "143L", "190"]
# Model Garden sizes every level from the width and only supports multiples of 128; a
# non-square size checks that we do not mix up height and width.
SIZES = [(128, 128), (128, 256)]


def _trainable(model):
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def _check_parity(model_id, hw, rng):
    model_garden()
    from spinenet_tf.convert.model_garden import build_model_garden_backbone

    source = build_model_garden_backbone(model_id, input_shape=(*hw, 3))
    randomize_batch_norm_stats(source, rng)
    target = spinenet_tf.build_backbone(model_id, input_shape=(*hw, 3))
    assert _trainable(target) == _trainable(source)
    from_model_garden(source, target)
    images = rng.uniform(0.0, 1.0, (2, *hw, 3)).astype("float32")
    expected = source(images, training=False)
    actual = target(images, training=False)
    for level in range(3, 8):
        ours, theirs = actual[f"P{level}"], expected[str(level)]
        assert np.abs(np.asarray(theirs)).mean() > 1e-2  # features are not trivially zero
        assert relative_max_diff(ours, theirs) <= 1e-4, (model_id, hw, level)


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("model_id", FAST_IDS)
def test_converted_features_equal_model_garden(model_id, hw, rng):
    _check_parity(model_id, hw, rng)


@pytest.mark.slow
@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("model_id", SLOW_IDS)
def test_converted_features_equal_model_garden_large(model_id, hw, rng):
    _check_parity(model_id, hw, rng)


def test_mismatched_models_name_the_first_differing_variable():
    model_garden()
    from spinenet_tf.convert.model_garden import build_model_garden_backbone

    source = build_model_garden_backbone("49S")
    with pytest.raises(ValueError, match=r"variable \d+: ours '.*' has shape .* but Model Garden"):
        from_model_garden(source, spinenet_tf.build_backbone("49"))
    with pytest.raises(ValueError, match=r"variable \d+: ours '.*' has shape"):
        from_model_garden(source, spinenet_tf.build_backbone("49S", max_level=6))


def _model_garden_retinanet(model_id, image_size, num_classes=3):
    import tf_keras
    from official.vision.configs import backbones, common, decoders
    from official.vision.configs import retinanet as retinanet_cfg
    from official.vision.modeling import factory

    config = retinanet_cfg.RetinaNet(
        num_classes=num_classes,
        input_size=[image_size, image_size, 3],
        backbone=backbones.Backbone(
            type="spinenet", spinenet=backbones.SpineNet(model_id=model_id)
        ),
        decoder=decoders.Decoder(type="identity"),
        head=retinanet_cfg.RetinaNetHead(num_convs=1, num_filters=32),
        norm_activation=common.NormActivation(activation="swish"),
    )
    input_specs = tf_keras.layers.InputSpec(shape=[None, image_size, image_size, 3])
    return factory.build_retinanet(input_specs, config)


def test_cli_converts_a_model_garden_detector_checkpoint(tmp_path, rng):
    model_garden()
    import tensorflow as tf

    detector = _model_garden_retinanet("49S", 128)
    randomize_batch_norm_stats(detector.backbone, rng)
    prefix = tf.train.Checkpoint(model=detector).save(str(tmp_path / "mg" / "ckpt"))
    output = tmp_path / "spinenet49s.weights.h5"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "spinenet_tf.convert",
            "--model_id=49S",
            f"--checkpoint={tmp_path / 'mg'}",
            f"--output={output}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {output}" in result.stdout

    ours = spinenet_tf.build_backbone("49S")
    ours.load_weights(output)
    images = rng.uniform(0.0, 1.0, (1, 128, 128, 3)).astype("float32")
    expected = detector.backbone(images, training=False)
    actual = ours(images, training=False)
    for level in range(3, 8):
        assert relative_max_diff(actual[f"P{level}"], expected[str(level)]) <= 1e-4
    del prefix


def test_cli_names_a_missing_or_mismatched_checkpoint(tmp_path):
    model_garden()
    from spinenet_tf.convert.__main__ import convert

    with pytest.raises(FileNotFoundError, match="no checkpoint at '.*nowhere'"):
        convert("49S", str(tmp_path / "nowhere"), str(tmp_path / "out.weights.h5"))
    with pytest.raises(ValueError, match=r"must end in \.weights\.h5 or \.keras"):
        convert("49S", str(tmp_path), str(tmp_path / "out.h5"))
    import tensorflow as tf

    tf.train.Checkpoint(step=tf.Variable(1)).save(str(tmp_path / "other" / "ckpt"))
    with pytest.raises(ValueError, match="holds no backbone matching"):
        convert("49S", str(tmp_path / "other"), str(tmp_path / "out.weights.h5"))
