import subprocess
import sys

import pytest

import spinenet_tf
from spinenet_tf.tools import summary
from tests.conftest import model_garden


@pytest.mark.slow  # the RetinaNet count below covers the default suite
def test_multiply_adds_equal_model_garden_profiler_count():
    model_garden()
    from spinenet_tf.convert.model_garden import build_model_garden_backbone

    for model_id in ("49S", "mobile-49XS"):
        ours = spinenet_tf.build_backbone(model_id, input_shape=(256, 256, 3))
        theirs = build_model_garden_backbone(model_id, input_shape=(256, 256, 3))
        a = summary.count_multiply_adds(ours, (256, 256))
        b = summary.count_multiply_adds(theirs, (256, 256))
        assert a > 0
        assert abs(a - b) / b < 1e-6, (model_id, a, b)


@pytest.mark.slow  # full size; 49S and mobile-49XS are counted against Model Garden above
def test_multiply_adds_of_49_at_640():
    # Model Garden 2.20 gives 28,500,067,461 for its own SpineNet-49 with swish (measured).
    macs = summary.count_multiply_adds(spinenet_tf.build_backbone("49"), (640, 640))
    assert abs(macs - 28_500_067_461) / 28_500_067_461 < 1e-6


def test_retinanet_multiply_adds_within_1_percent_of_model_garden():
    # Model Garden 2.20's figures (../shared/REFERENCE.md): 49S@640 31.0 G, 49@640 85.6 G.
    from spinenet_tf.models.retinanet import build_retinanet

    for model_id, expected in (("49S", 31.0e9), ("49", 85.6e9)):
        model = build_retinanet(model_id, num_classes=91, image_size=640)
        macs = summary.count_multiply_adds(model, (640, 640))
        assert abs(macs - expected) / expected < 0.01, (model_id, macs)


def test_parse_image_size():
    assert summary.parse_image_size("640") == (640, 640)
    assert summary.parse_image_size("512x384") == (512, 384)
    with pytest.raises(ValueError, match="image size '0x4'"):
        summary.parse_image_size("0x4")


@pytest.mark.slow  # a subprocess building two models
def test_cli_prints_the_table():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "spinenet_tf.tools.summary",
            "--model_id=mobile-49XS",
            "--image_size=256",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| mobile-49XS | 256x256 | 842,456 | 869,400 |" in result.stdout
    # Model Garden publishes 872,711 and 0.241 G, the latter with its box decoding counted
    # (its network alone: 0.19 G in training mode); ours is the network in inference mode.
    assert "| 872,711 | 0.180 |" in result.stdout, result.stdout


@pytest.mark.slow  # full-size Mask R-CNN graphs; 49S@640 takes about 20 s
@pytest.mark.parametrize(
    "model_id, size, expected",
    # Model Garden 2.20's measured figures (../shared/REFERENCE.md, WAVE2.md 1.5).
    [("49", 640, 215.8e9), ("96", 1024, 314.9e9), ("143", 1280, 499.1e9)],
)
def test_maskrcnn_multiply_adds_within_1_percent_of_model_garden(model_id, size, expected):
    from spinenet_tf.models.mask_rcnn import build_maskrcnn

    macs = summary.count_multiply_adds(build_maskrcnn(model_id, 91, size), (size, size))
    assert abs(macs - expected) / expected < 0.01, (model_id, macs)
