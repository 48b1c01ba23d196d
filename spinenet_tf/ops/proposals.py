"""Region proposals (Faster R-CNN, Ren et al. 2015, Sec. 3.1) and Mask R-CNN's second-stage
decoding, with static shapes (XLA, TPUs)."""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from spinenet_tf.ops.boxes import decode_boxes
from spinenet_tf.ops.postprocess import (
    DetectionConfig,
    class_specific_detections,
    clip_boxes,
    non_max_suppression_padded,
    top_k_per_level,
)

# Fast R-CNN's box-coding weights for (dy, dx, dh, dw) of the second stage (Detectron,
# tensorflow/tpu, Model Garden); the RPN's deltas are unweighted.
ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


@dataclasses.dataclass(frozen=True)
class ProposalConfig:
    """How RPN outputs become proposals (tensorflow/tpu and Model Garden's values): each
    level's top `pre_nms_top_k` anchors by score (`test_pre_nms_top_k` at inference), decoded
    and clipped, greedy NMS at `iou_threshold` within each level, then the best
    `num_proposals` (`test_num_proposals`) of all levels."""

    pre_nms_top_k: int = 2000
    test_pre_nms_top_k: int = 1000
    iou_threshold: float = 0.7
    num_proposals: int = 1000
    test_num_proposals: int = 1000

    def __post_init__(self):
        counts = (
            self.pre_nms_top_k,
            self.test_pre_nms_top_k,
            self.num_proposals,
            self.test_num_proposals,
        )
        if min(counts) < 1:
            raise ValueError(f"proposal counts must be >= 1, got {self}")
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold {self.iou_threshold} must be in (0, 1]")

    def settings(self, training: bool) -> tuple[int, int]:
        """(pre_nms_top_k, num_proposals) for the mode."""
        if training:
            return self.pre_nms_top_k, self.num_proposals
        return self.test_pre_nms_top_k, self.test_num_proposals


def generate_proposals(
    scores,
    deltas,
    anchors,
    level_sizes,
    image_hw,
    pre_nms_top_k: int = 2000,
    num_proposals: int = 1000,
    iou_threshold: float = 0.7,
    valid_hw=None,
):
    """Proposals from RPN objectness logits [B, N] and deltas [B, N, 4] over anchors [N, 4]
    (levels concatenated, `level_sizes` anchors each).

    Per level: the top `pre_nms_top_k` anchors by score, decoded (log-scale deltas clipped
    at log(1000 / 16)), clipped to the image (`valid_hw` [B, 2] of each image, else
    image_hw), greedy NMS at `iou_threshold`. Then the best `num_proposals` over all levels.
    NMS is one static-shape loop over all levels' candidates, each level a group of its own:
    per-level NMS merged by score is the same selection. As in Model Garden's padded NMS, a
    box clipped to the top-left corner (no positive coordinate) is never kept.

    Returns rois [B, num_proposals, 4] (input pixels) and their scores (sigmoid) [B,
    num_proposals], best first, rows past the kept ones zero; no gradient flows through
    them (the RPN learns from its own losses only, as in the reference).
    """
    logits, anchor_idx, _ = top_k_per_level(
        tf.cast(scores, tf.float32)[..., None], level_sizes, pre_nms_top_k
    )
    anchors = tf.convert_to_tensor(anchors, tf.float32)
    boxes = decode_boxes(
        tf.gather(tf.cast(deltas, tf.float32), anchor_idx, batch_dims=1),
        tf.gather(anchors, anchor_idx),
    )
    boxes = clip_boxes(boxes, image_hw, valid_hw)
    starts = np.cumsum(level_sizes)[:-1]
    level = tf.add_n(
        [tf.zeros_like(anchor_idx)] + [tf.cast(anchor_idx >= s, tf.int32) for s in starts]
    )
    probs = tf.sigmoid(logits)
    live = tf.where(tf.reduce_any(boxes > 0.0, axis=-1), probs, -np.inf)
    kept, valid = non_max_suppression_padded(boxes, live, num_proposals, iou_threshold, level)
    valid = tf.cast(valid, tf.float32)
    rois = tf.gather(boxes, kept, batch_dims=1) * valid[..., None]
    roi_scores = tf.gather(probs, kept, batch_dims=1) * valid
    return tf.stop_gradient(rois), tf.stop_gradient(roi_scores)


def detect_from_rois(
    class_logits,
    box_deltas,
    rois,
    image_hw,
    config: DetectionConfig | None = None,
    valid_hw=None,
    weights=ROI_BOX_WEIGHTS,
) -> dict:
    """Mask R-CNN detections from the box head's outputs on rois [B, R, 4]: softmax over
    class_logits [B, R, K] (class 0 background, dropped), class-specific box_deltas
    [B, R, 4 K] decoded against the rois (weights [10, 10, 5, 5]) and clipped, then each
    class's NMS (`class_specific_detections`). Returns boxes, scores, classes (1-based),
    num_detections as `generate_detections`."""
    probs = tf.nn.softmax(tf.cast(class_logits, tf.float32), axis=-1)[:, :, 1:]
    num_rois, num_classes = probs.shape[1], probs.shape[2] + 1
    deltas = tf.reshape(tf.cast(box_deltas, tf.float32), [-1, num_rois, num_classes, 4])
    deltas = deltas[:, :, 1:] / tf.constant(weights, tf.float32)
    boxes = decode_boxes(deltas, tf.cast(rois, tf.float32)[:, :, None, :])
    flat = clip_boxes(tf.reshape(boxes, [-1, num_rois * (num_classes - 1), 4]), image_hw, valid_hw)
    boxes = tf.reshape(flat, [-1, num_rois, num_classes - 1, 4])
    return class_specific_detections(boxes, probs, config or DetectionConfig())
