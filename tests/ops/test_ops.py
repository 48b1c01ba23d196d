import numpy as np
import tensorflow as tf

from spinenet_tf.ops.anchors import AnchorConfig
from spinenet_tf.ops.boxes import decode_boxes, encode_boxes, pairwise_iou
from spinenet_tf.ops.targets import LossConfig, build_targets, retinanet_losses
from tests.conftest import model_garden


def test_anchor_golden_values_and_counts():
    config = AnchorConfig(
        min_level=3, max_level=4, num_scales=1, aspect_ratios=(1.0, 2.0), anchor_size=4.0
    )
    boxes = config.level_boxes((64, 64), 3)
    assert boxes.shape == (8, 8, 2, 4)
    # Level 3: stride 8, first centre (4, 4), base size 4 * 8 = 32.
    np.testing.assert_allclose(boxes[0, 0, 0], [-12, -12, 20, 20])
    half_w, half_h = 32 * 2**0.5 / 2, 32 / 2**0.5 / 2  # aspect 2 = twice as wide as tall
    np.testing.assert_allclose(
        boxes[0, 0, 1], [4 - half_h, 4 - half_w, 4 + half_h, 4 + half_w], rtol=1e-6
    )
    assert config.boxes((64, 64)).shape == (config.num_anchors((64, 64)), 4) == (160, 4)
    assert AnchorConfig().num_anchors((333, 500)) == 9 * sum(
        -(-333 // 2**lvl) * -(-500 // 2**lvl) for lvl in range(3, 8)
    )


def test_anchors_equal_model_garden_at_any_size():
    model_garden()
    from official.vision.ops.anchor import Anchor

    for hw in [(640, 640), (333, 500)]:
        theirs = Anchor(3, 7, 3, [0.5, 1.0, 2.0], 3.0, list(hw)).multilevel_boxes
        ours = AnchorConfig()
        for level in range(3, 8):
            np.testing.assert_allclose(
                ours.level_boxes(hw, level).reshape(-1, 4),
                np.reshape(theirs[str(level)], (-1, 4)),
                rtol=1e-5,
                atol=1e-3,
            )


def test_box_coding_round_trip_and_clip():
    anchors = tf.constant([[0.0, 0.0, 10.0, 20.0], [5.0, 5.0, 25.0, 15.0]])
    boxes = tf.constant([[1.0, 2.0, 9.0, 30.0], [0.0, 0.0, 40.0, 10.0]])
    deltas = encode_boxes(boxes, anchors)
    np.testing.assert_allclose(deltas[0], [0.0, 0.3, np.log(0.8), np.log(1.4)], rtol=1e-5)
    np.testing.assert_allclose(decode_boxes(deltas, anchors), boxes, atol=1e-4)
    huge = decode_boxes(tf.constant([[0.0, 0.0, 100.0, 100.0]]), anchors[:1])
    assert np.all(np.isfinite(huge))


def test_pairwise_iou_golden():
    a = tf.constant([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 0.0, 0.0]])
    b = tf.constant([[0.0, 5.0, 10.0, 15.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 10.0, 10.0]])
    np.testing.assert_allclose(pairwise_iou(a, b), [[1 / 3, 0, 1], [0, 0, 0]], rtol=1e-6)


ANCHORS = np.array(
    [
        [0, 0, 10, 10],  # IoU 1.0 with gt 0 -> positive
        [0, 3, 10, 13],  # IoU 0.538 with gt 0 -> positive
        [0, 4.5, 10, 14.5],  # IoU 0.379 -> negative
        [0, 4, 10, 14],  # IoU 0.429 -> ignored
        [50, 50, 60, 60],  # no overlap -> negative
        [100, 100, 110, 110],  # inside the crowd box -> ignored
        [200, 200, 230, 210],  # best anchor of gt 1 (IoU 0.25) -> forced positive
    ],
    np.float32,
)


def test_matching_is_batched_and_runs_in_tf_data_and_xla():
    gt_boxes = np.zeros((2, 3, 4), np.float32)
    gt_boxes[0, 0] = [0, 0, 10, 10]
    gt_classes = np.array([[2, -1, -1], [-1, -1, -1]], np.int32)
    batched = build_targets(ANCHORS, gt_boxes, gt_classes)
    assert batched["cls_targets"].shape == (2, 7)
    np.testing.assert_array_equal(batched["cls_targets"][1], 0)
    ds = tf.data.Dataset.from_tensor_slices((gt_boxes, gt_classes)).map(
        lambda b, c: build_targets(ANCHORS, b, c)
    )
    first = next(iter(ds))
    np.testing.assert_array_equal(first["cls_targets"], batched["cls_targets"][0])
    xla = tf.function(lambda b, c: build_targets(ANCHORS, b, c), jit_compile=True)
    np.testing.assert_array_equal(xla(gt_boxes, gt_classes)["box_weights"], batched["box_weights"])


def test_focal_and_huber_losses_match_the_formulas():
    logits = np.array([[[0.0, 2.0, -1.0], [0.0, -3.0, 0.5]]], np.float32)
    targets = {
        "cls_targets": np.array([[1, 0]]),
        "box_targets": np.array([[[0.1, 0.0, -0.3, 0.0], [0.0] * 4]], np.float32),
        "cls_weights": np.array([[1.0, 1.0]], np.float32),
        "box_weights": np.array([[1.0, 0.0]], np.float32),
    }
    deltas = np.array([[[0.0, 0.05, 0.0, 0.0], [9.0] * 4]], np.float32)
    config = LossConfig(focal_alpha=0.25, focal_gamma=1.5, huber_delta=0.1, box_loss_weight=50.0)
    out = retinanet_losses(logits, deltas, targets, config)

    def focal(x, y):
        p = 1 / (1 + np.exp(-x))
        pt = p if y else 1 - p
        return -(0.25 if y else 0.75) * (1 - pt) ** 1.5 * np.log(pt)

    # Channel 0 (background) is not in the loss; anchor 0 is class 1, anchor 1 background.
    cls = focal(2.0, 1) + focal(-1.0, 0) + focal(-3.0, 0) + focal(0.5, 0)
    huber = np.mean([0.5 * 0.1**2, 0.5 * 0.05**2, 0.1 * (0.3 - 0.05), 0.0])
    np.testing.assert_allclose(out["cls_loss"], cls / 2.0, rtol=1e-5)
    np.testing.assert_allclose(out["box_loss"], huber / 2.0, rtol=1e-5)
    np.testing.assert_allclose(out["total_loss"], cls / 2.0 + 50 * huber / 2.0, rtol=1e-5)
