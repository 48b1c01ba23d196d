"""Anchor matching (SpineNet's own defaults and the options) and the RetinaNet losses."""

import numpy as np
import pytest
import tensorflow as tf

from spinenet_tf.ops.boxes import decode_boxes
from spinenet_tf.ops.targets import (
    IGNORED,
    NEGATIVE,
    AnchorLabeler,
    MatchingConfig,
    build_targets,
    match_anchors,
)

ANCHORS = np.array(
    [
        [0, 0, 10, 10],  # IoU 1.0 with gt 0 -> positive
        [0, 3, 10, 13],  # IoU 0.538 with gt 0 -> positive
        [0, 4.5, 10, 14.5],  # IoU 0.379 -> negative
        [0, 4, 10, 14],  # IoU 0.429 -> negative (ignored with the paper's 0.4 band)
        [50, 50, 60, 60],  # no overlap -> negative
        [100, 100, 110, 110],  # inside the crowd box -> negative (ignored by IoA)
        [200, 200, 230, 210],  # best anchor of gt 1 (IoU 0.25) -> forced positive
    ],
    np.float32,
)
GT_BOXES = np.array(
    [[0, 0, 10, 10], [200, 200, 210, 230], [98, 98, 112, 112], [0, 0, 0, 0]], np.float32
)
GT_CLASSES = np.array([3, 7, 5, -1], np.int32)
CROWD = np.array([False, False, True, False])


def test_default_matching_is_spinenets_own():
    """0.5 / 0.5 without an ignore band, forced best anchors, crowd boxes dropped
    (tensorflow/tpu and Model Garden's RetinaNet configs)."""
    t = build_targets(ANCHORS, GT_BOXES, GT_CLASSES, CROWD)
    np.testing.assert_array_equal(t["cls_targets"], [3, 3, 0, 0, 0, 0, 7])
    np.testing.assert_array_equal(t["box_weights"], [1, 1, 0, 0, 0, 0, 1])
    np.testing.assert_array_equal(t["cls_weights"], [1, 1, 1, 1, 1, 1, 1])
    np.testing.assert_allclose(t["box_targets"][0], [0, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(
        decode_boxes(t["box_targets"][1], ANCHORS[1]), GT_BOXES[0], atol=1e-4
    )
    unforced = build_targets(ANCHORS, GT_BOXES, GT_CLASSES, CROWD, force_match=False)
    assert int(unforced["cls_targets"][6]) == 0


def test_paper_ignore_band_and_crowd_ignore_by_intersection_over_anchor():
    band = build_targets(ANCHORS, GT_BOXES, GT_CLASSES, CROWD, unmatched_iou=0.4)
    np.testing.assert_array_equal(band["cls_weights"], [1, 1, 1, 0, 1, 1, 1])
    ioa = build_targets(ANCHORS, GT_BOXES, GT_CLASSES, CROWD, crowd_ignore_ioa=0.5)
    np.testing.assert_array_equal(ioa["cls_weights"], [1, 1, 1, 1, 1, 0, 1])


def test_a_large_crowd_box_ignores_the_small_anchors_inside_it():
    # 100 anchors of 8 px inside a 200-px crowd region: each has IoU 0.0016 with it (so an
    # IoU rule never fires) and intersection over its own area 1.
    ys, xs = np.meshgrid(np.arange(10) * 20.0, np.arange(10) * 20.0, indexing="ij")
    small = np.stack([ys, xs, ys + 8, xs + 8], -1).reshape(-1, 4).astype(np.float32)
    anchors = np.concatenate([small, [[300, 300, 308, 308]]]).astype(np.float32)
    boxes = np.array([[0, 0, 200, 200], [300, 300, 308, 308]], np.float32)
    classes, crowd = np.array([1, 2]), np.array([True, False])
    dropped = match_anchors(anchors, boxes, classes, crowd).numpy()
    np.testing.assert_array_equal(dropped[:100], NEGATIVE)
    ignored = match_anchors(anchors, boxes, classes, crowd, crowd_ignore_ioa=0.5).numpy()
    np.testing.assert_array_equal(ignored[:100], IGNORED)
    assert dropped[100] == ignored[100] == 1


def test_force_match_overrides_and_the_first_box_wins_a_shared_anchor():
    anchors = np.array([[0, 0, 10, 10], [0, 0, 10, 16], [50, 50, 60, 60]], np.float32)
    boxes = np.array(
        [
            [0, 0, 10, 11],  # best anchor 0 (IoU 0.91)
            [0, 0, 10, 30],  # best anchor 1 (IoU 0.53), which box 2 also picks
            [0, 0, 10, 17],  # IoU 0.94 with anchor 1, yet box 1 came first
            [80, 80, 90, 90],  # overlaps nothing: still forced, onto anchor 0 (argmax of 0s)
        ],
        np.float32,
    )
    matches = match_anchors(anchors, boxes, np.array([1, 2, 3, 4])).numpy()
    np.testing.assert_array_equal(matches, [0, 1, NEGATIVE])
    # MG's BoxMatcher gives anchor 0 to box 0 (its best), not to box 3: box 0 comes first.
    xla = tf.function(lambda b: match_anchors(anchors, b, np.array([1, 2, 3, 4])), jit_compile=True)
    np.testing.assert_array_equal(xla(boxes), matches)


def test_labeler_matches_on_the_host_and_encodes_the_same_targets_as_in_the_graph():
    """The input pipeline's compact matches, encoded by the train step, are the targets of a
    whole in-graph assignment, for the labeler's MatchingConfig."""
    labeler = AnchorLabeler(ANCHORS, MatchingConfig(unmatched_iou=0.4, crowd_ignore_ioa=0.5))
    y = {"boxes": GT_BOXES[None], "classes": GT_CLASSES[None], "is_crowd": CROWD[None]}
    whole = labeler.targets(y)
    encoded = labeler.targets({**y, **labeler.matches(y)})
    expected = build_targets(
        ANCHORS, GT_BOXES[None], GT_CLASSES[None], CROWD[None], 0.5, 0.4, True, 0.5
    )
    for key, value in expected.items():
        np.testing.assert_array_equal(whole[key], value, err_msg=key)
        np.testing.assert_array_equal(encoded[key], value, err_msg=key)
    assert labeler.targets(expected) is expected  # built targets pass through
    np.testing.assert_array_equal(expected["cls_weights"][0], [1, 1, 1, 0, 1, 0, 1])


def test_matching_config_rejects_inconsistent_thresholds():
    with pytest.raises(ValueError, match=r"unmatched_iou \(0.6\) <= match_iou \(0.5\)"):
        MatchingConfig(unmatched_iou=0.6)
    with pytest.raises(ValueError, match="crowd_ignore_ioa 0 must be in"):
        MatchingConfig(crowd_ignore_ioa=0)
