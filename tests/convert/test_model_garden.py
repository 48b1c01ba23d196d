"""Fidelity: with converted weights, our backbones compute what Model Garden's compute."""

import subprocess
import sys

import numpy as np
import pytest

import spinenet_tf
from spinenet_tf.convert import from_model_garden
from spinenet_tf.tools.summary import count_parameters
from tests.conftest import (
    HEAVY_MEMORY,
    model_garden,
    randomize_batch_norm_stats,
    relative_max_diff,
)

# The default suite checks one id of each family; the slow suite every other one.
FAST_IDS = ["49S", "mobile-49XS"]
SLOW_IDS = ["49", "96", "143", "143L", "190", "mobile-49S", "mobile-49"]
# Model Garden sizes every level from the width and only supports multiples of 128; a
# non-square size checks that we do not mix up height and width.
SIZES = [(128, 128), (128, 256)]


def _check_parity(model_id, hw, rng):
    model_garden()
    from spinenet_tf.convert.model_garden import build_model_garden_backbone

    source = build_model_garden_backbone(model_id, input_shape=(*hw, 3))
    randomize_batch_norm_stats(source, rng)
    target = spinenet_tf.build_backbone(model_id, input_shape=(*hw, 3))
    assert count_parameters(target) == count_parameters(source)
    from_model_garden(source, target)
    images = rng.uniform(0.0, 1.0, (2, *hw, 3)).astype("float32")
    expected = source(images, training=False)
    actual = target(images, training=False)
    for level in range(3, 8):
        ours, theirs = actual[f"P{level}"], expected[str(level)]
        assert np.abs(np.asarray(theirs)).mean() > 1e-2  # features are not trivially zero
        assert relative_max_diff(ours, theirs) <= 1e-4, (model_id, hw, level)


# The default suite checks the non-square size (height and width not mixed up).
@pytest.mark.parametrize(
    "hw", [pytest.param(hw, marks=pytest.mark.slow) if hw[0] == hw[1] else hw for hw in SIZES]
)
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
    with pytest.raises(
        ValueError, match=r"backbone variable \d+: ours '.*' has shape .* but Model Garden"
    ):
        from_model_garden(source, spinenet_tf.build_backbone("49"))
    with pytest.raises(ValueError, match=r"backbone variable \d+: ours '.*' has shape"):
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


@pytest.mark.slow  # a subprocess building two detectors
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


def _check_retinanet_parity(model_id, rng, detections=True):
    model_garden()
    import tensorflow as tf

    from spinenet_tf.convert.model_garden import build_model_garden_retinanet
    from spinenet_tf.models.base import flatten_levels
    from spinenet_tf.models.retinanet import build_retinanet
    from spinenet_tf.ops.postprocess import DetectionConfig

    size, num_classes = 128, 5
    # Model Garden's generator keeps its top 5000 per class (every anchor of this small
    # image); so does ours with its per-class selection.
    source = build_model_garden_retinanet(model_id, num_classes, size, pre_nms_top_k=5000)
    randomize_batch_norm_stats(source, rng)
    for v in source.head.variables:
        # Spread the scores so detections have no ties, and move the boxes off the anchor
        # grid, where neighbours overlap with IoU exactly 0.5, the NMS threshold itself.
        if "scores" in v.name:
            spread = (-2.0, 0.5) if "bias" in v.name else (0.0, 0.5)
            v.assign(rng.normal(*spread, v.shape).astype("float32"))
        elif "boxes" in v.name and "kernel" in v.name:
            v.assign(rng.normal(0.0, 0.02, v.shape).astype("float32"))
    target = build_retinanet(
        model_id,
        num_classes,
        size,
        detection=DetectionConfig(pre_nms="per_class", pre_nms_top_k=5000),
    )
    from_model_garden(source, target)
    # Smooth images: per-pixel noise averages out into near-constant deep features, whose
    # tied scores would make NMS's choice arbitrary.
    images = tf.image.resize(rng.uniform(0, 255, (2, 8, 8, 3)).astype("float32"), (size, size))
    theirs = source(images, image_shape=tf.constant([[size, size]] * 2, tf.float32), training=False)
    ours = target(images, training=False)
    levels = range(3, 8)
    expected = {
        "class_logits": flatten_levels(
            {f"P{lv}": theirs["cls_outputs"][str(lv)] for lv in levels}, num_classes
        ),
        "box_deltas": flatten_levels(
            {f"P{lv}": theirs["box_outputs"][str(lv)] for lv in levels}, 4
        ),
    }
    for key in expected:
        assert relative_max_diff(ours[key], expected[key]) <= 1e-4, key
    if not detections:
        return
    # Decoding is compared on the same raw outputs (Model Garden's): the networks agree to
    # float noise (~3e-7), and near-tied overlapping candidates would let that noise pick a
    # different box in NMS on either side. Both sides see every candidate (see above).
    det = target.detect(expected)
    np.testing.assert_array_equal(det["num_detections"], theirs["num_detections"])
    assert int(np.min(det["num_detections"])) > 10
    for b in range(2):
        n = int(det["num_detections"][b])
        scores = np.asarray(theirs["detection_scores"][b, :n])
        np.testing.assert_allclose(det["scores"][b, :n], scores, rtol=1e-6)
        # Detections of equal score (a random head gives some: two boxes of one anchor
        # position that NMS keeps both) may come in either order: compare each run of
        # equal scores as a set, ordered by class and box.
        starts = np.flatnonzero(np.r_[True, ~np.isclose(scores[1:], scores[:-1], rtol=1e-6)])
        stops = np.r_[starts[1:], n]
        if n == det["scores"].shape[1]:
            # A run of equal scores cut by the detection limit: which of the tied candidates
            # made the cut is arbitrary on both sides. Its scores are compared above.
            starts, stops = starts[:-1], stops[:-1]
        assert len(stops) and stops[-1] > 10  # most detections are compared one by one
        for start, stop in zip(starts, stops, strict=True):
            rows = []
            for side, (cls_key, box_key) in (
                (det, ("classes", "boxes")),
                (theirs, ("detection_classes", "detection_boxes")),
            ):
                classes = np.asarray(side[cls_key][b, start:stop], np.float64)
                boxes = np.asarray(side[box_key][b, start:stop], np.float64)
                table = np.column_stack([classes, boxes])
                rows.append(table[np.lexsort(np.round(table, 2).T[::-1])])
            np.testing.assert_array_equal(rows[0][:, 0], rows[1][:, 0])
            np.testing.assert_allclose(rows[0][:, 1:], rows[1][:, 1:], atol=1e-3)


def test_converted_retinanet_outputs_and_detections_equal_model_garden(rng):
    _check_retinanet_parity("49S", rng)


@pytest.mark.slow  # the mobile head; decoding is checked on 49S above
def test_converted_mobile_retinanet_outputs_equal_model_garden(rng):
    # A random SpineNet-Mobile head scores neighbouring anchors equal to 1e-7, below float
    # noise, so which of them NMS keeps is arbitrary on both sides; decoding is the same
    # code for every model id and is compared on 49S above.
    _check_retinanet_parity("mobile-49XS", rng, detections=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_id",
    ["49", "96", pytest.param("143", marks=HEAVY_MEMORY), pytest.param("190", marks=HEAVY_MEMORY)]
    + ["mobile-49S", "mobile-49"],
)
def test_converted_retinanet_equals_model_garden_large(model_id, rng):
    # Detections are compared where a random head gives distinct scores: 143's and 190's
    # saturate (all 100 detections score the same within 1e-6, so which candidates NMS keeps
    # is arbitrary on both sides), as the mobile heads tie (see above). Decoding is the same
    # code for every model id.
    _check_retinanet_parity(model_id, rng, detections=model_id in ("49", "96"))


@pytest.mark.slow  # Model Garden's and our full-width 49S, and twelve training steps
def test_fine_tuning_from_a_converted_model_garden_detector(shapes_records, shapes_dir, tmp_path):
    """The README's fine-tuning path: Model Garden RetinaNet-49S with 91 classes -> its
    checkpoint -> `convert --num_classes=91` to a checkpoint prefix -> an experiment on the
    shapes data (5 classes) with init_checkpoint: the backbone and the box head start as
    converted, the class output (91 -> 5 classes) fresh, and the loss falls."""
    model_garden()
    import tensorflow as tf

    from spinenet_tf.convert.__main__ import convert
    from spinenet_tf.convert.model_garden import build_model_garden_retinanet
    from spinenet_tf.training.trainer import Trainer
    from tests.conftest import tiny_experiment

    detector = build_model_garden_retinanet("49S", 91, 128)
    tf.train.Checkpoint(model=detector).save(str(tmp_path / "mg" / "ckpt"))
    prefix = str(tmp_path / "converted" / "ckpt")
    converted = convert("49S", str(tmp_path / "mg"), prefix, image_size=128, num_classes=91)
    assert tf.io.gfile.exists(prefix + ".index")

    config = tiny_experiment(
        shapes_records,
        shapes_dir,
        image_size=128,
        model_overrides={},  # full width: the checkpoint's backbone
        train_steps=12,
        steps_per_loop=4,
        checkpoint_every=12,
        init_checkpoint=prefix,
    )
    trainer = Trainer(config, tmp_path / "run")
    assert trainer.restore() == 0
    for ours, theirs in zip(
        trainer.model.backbone.weights, converted.backbone.weights, strict=True
    ):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    head = {w.path: w.numpy() for w in converted.head.weights}
    for w in trainer.model.head.weights:
        if w.path.startswith("head/classifier/"):  # 9 anchors x 91 classes -> 9 x 5: fresh
            assert w.shape != head[w.path].shape
        else:
            np.testing.assert_array_equal(w.numpy(), head[w.path])
    trainer.train()
    losses = [h["total_loss"] for h in trainer.history]
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_converted_maskrcnn_equals_model_garden(rng):
    """RPN outputs, proposals, box head outputs, detections and masks of a converted Model
    Garden Mask R-CNN-SpineNet-49S, each stage on the same inputs as Model Garden's (float
    noise of ~1e-6 in one stage would otherwise let near-tied candidates swap in the next)."""
    model_garden()
    import tensorflow as tf

    from spinenet_tf.convert.model_garden import build_model_garden_maskrcnn
    from spinenet_tf.models.base import flatten_levels
    from spinenet_tf.models.mask_rcnn import build_maskrcnn
    from spinenet_tf.ops.proposals import detect_from_rois, generate_proposals
    from spinenet_tf.ops.roi_align import multilevel_roi_align

    size, num_classes, levels = 128, 5, range(3, 8)
    source = build_model_garden_maskrcnn("49S", num_classes, size, 128, 512)
    randomize_batch_norm_stats(source, rng)
    for v in source.detection_head[0].variables:  # spread the class scores: fewer ties
        if "detection-scores" in v.name:
            v.assign(rng.normal(0.0, 0.3, v.shape).astype("float32"))
    target = build_maskrcnn("49S", num_classes, size)
    assert count_parameters(target) == count_parameters(source)
    from_model_garden(source, target)
    images = tf.image.resize(rng.uniform(0, 255, (2, 8, 8, 3)).astype("float32"), (size, size))
    image_shape = tf.constant([[size, size]] * 2, tf.float32)
    theirs = source(images, image_shape=image_shape, training=False)

    # RPN outputs.
    features = target.backbone(images, training=False)
    scores, deltas = target.rpn_head(features, training=False)
    for ours, key, width in ((scores, "rpn_scores", 1), (deltas, "rpn_boxes", 4)):
        expected = flatten_levels({f"P{lv}": theirs[key][str(lv)] for lv in levels}, width)
        assert relative_max_diff(flatten_levels(ours, width), expected) <= 1e-4, key

    # Proposals from Model Garden's RPN outputs.
    mg_scores = flatten_levels({f"P{lv}": theirs["rpn_scores"][str(lv)] for lv in levels}, 1)
    mg_deltas = flatten_levels({f"P{lv}": theirs["rpn_boxes"][str(lv)] for lv in levels}, 4)
    rois, _ = generate_proposals(
        mg_scores[..., 0],
        mg_deltas,
        target.anchor_boxes,
        target.level_sizes,
        (size, size),
        1000,
        1000,
        0.7,
    )
    anchors = {str(lv): tf.tile(a[None], [2, 1, 1, 1]) for lv, a in _mg_anchor_boxes(size).items()}
    mg_rois, _ = source.roi_generator(
        theirs["rpn_boxes"], theirs["rpn_scores"], anchors, image_shape, False
    )
    np.testing.assert_allclose(rois, mg_rois, atol=1e-3)

    # Box head on Model Garden's proposals, then detections from Model Garden's outputs.
    roi_features = multilevel_roi_align(features, mg_rois, 7)
    class_logits, box_deltas = target.box_head(roi_features, training=False)
    assert relative_max_diff(class_logits, theirs["cls_outputs"]) <= 1e-4
    assert relative_max_diff(box_deltas, theirs["box_outputs"]) <= 1e-4
    det = detect_from_rois(
        theirs["cls_outputs"],
        theirs["box_outputs"],
        mg_rois,
        (size, size),
        target.detection_config,
    )
    np.testing.assert_array_equal(det["num_detections"], theirs["num_detections"])
    assert int(np.min(det["num_detections"])) > 10
    n = int(det["num_detections"][0])
    np.testing.assert_allclose(det["scores"][:, :n], theirs["detection_scores"][:, :n], rtol=1e-5)
    np.testing.assert_allclose(det["boxes"][:, :n], theirs["detection_boxes"][:, :n], atol=1e-3)
    np.testing.assert_array_equal(det["classes"][:, :n], theirs["detection_classes"][:, :n])

    # Masks of Model Garden's detections.
    boxes = tf.cast(theirs["detection_boxes"], tf.float32)
    logits = target.mask_head(
        (multilevel_roi_align(features, boxes, 14), theirs["detection_classes"]), training=False
    )
    assert relative_max_diff(tf.sigmoid(logits), theirs["detection_masks"]) <= 1e-4


def _mg_anchor_boxes(size):
    from official.vision.ops import anchor

    return anchor.Anchor(3, 7, 1, [0.5, 1.0, 2.0], 3.0, (size, size)).multilevel_boxes


@pytest.mark.slow  # builds Model Garden's and our Mask R-CNN twice
def test_cli_converts_a_model_garden_maskrcnn_checkpoint(tmp_path, rng):
    model_garden()
    import tensorflow as tf

    from spinenet_tf.convert.__main__ import convert
    from spinenet_tf.convert.model_garden import build_model_garden_maskrcnn
    from spinenet_tf.models.mask_rcnn import build_maskrcnn
    from spinenet_tf.training.checkpoints import init_from_checkpoint

    source = build_model_garden_maskrcnn("49S", 5, 128, 128, 512)
    randomize_batch_norm_stats(source, rng)
    tf.train.Checkpoint(model=source).save(str(tmp_path / "mg" / "ckpt"))
    output = str(tmp_path / "converted" / "ckpt")
    convert("49S", str(tmp_path / "mg"), output, image_size=128, num_classes=5, head="maskrcnn")
    # An experiment starts from the converted checkpoint: every variable restored.
    ours = build_maskrcnn("49S", 5, 128)
    report = init_from_checkpoint(ours, output)
    assert len(report.loaded) > 300
    assert all("seed" in path for path in report.fresh), report.summary()  # sampler state
    expected = [
        w for w in source.mask_head.weights if "mask-logits" in w.name and "kernel" in w.name
    ]
    np.testing.assert_array_equal(ours.mask_head.logits.kernel, expected[0].numpy())
    with pytest.raises(ValueError, match="holds no retinanet matching"):
        convert("49S", str(tmp_path / "mg"), str(tmp_path / "r" / "ckpt"), num_classes=5)
    with pytest.raises(ValueError, match="ids 49S, 49, 96 and 143"):
        convert("190", str(tmp_path / "mg"), output, num_classes=5, head="maskrcnn")
