"""RetinaNet anchor matching, regression targets and losses (Lin et al. 2017, Sec. 4)."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from spinenet_tf.ops.boxes import box_area, encode_boxes

# Class id 0 is background; padded ground-truth rows carry class -1.
BACKGROUND = 0
PADDING = -1


# Values of `match_anchors` for anchors without a matched box.
NEGATIVE = -1
IGNORED = -2


@dataclasses.dataclass(frozen=True)
class MatchingConfig:
    """How anchors are matched to ground truth (see `build_targets` for each field).

    The defaults are SpineNet's own (tensorflow/tpu and Model Garden): positive at IoU >= 0.5,
    negative below, no ignore band, each box's best anchor forced, crowd boxes dropped. The
    RetinaNet paper's ignore band is unmatched_iou=0.4.
    """

    match_iou: float = 0.5
    unmatched_iou: float = 0.5
    force_match: bool = True
    crowd_ignore_ioa: float | None = None

    def __post_init__(self):
        if not 0.0 <= self.unmatched_iou <= self.match_iou <= 1.0:
            raise ValueError(
                f"need 0 <= unmatched_iou ({self.unmatched_iou}) <= match_iou "
                f"({self.match_iou}) <= 1"
            )
        if self.crowd_ignore_ioa is not None and not 0.0 < self.crowd_ignore_ioa <= 1.0:
            raise ValueError(f"crowd_ignore_ioa {self.crowd_ignore_ioa} must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """RetinaNet's losses (see `retinanet_losses`): focal loss (alpha, gamma), Huber box loss
    (delta) weighted by box_loss_weight; the defaults are SpineNet's COCO recipe."""

    focal_alpha: float = 0.25
    focal_gamma: float = 1.5
    huber_delta: float = 0.1
    box_loss_weight: float = 50.0
    train_background: bool = False


class AnchorLabeler:
    """Target assignment for an anchor-based head: its anchors and a MatchingConfig.

    The input pipeline calls `matches` (compact matches, on the host); the train step calls
    `targets`, which encodes them on the accelerator, or does the whole assignment in the
    graph from padded ground truth, or passes built targets through.
    """

    def __init__(self, anchors, matching: MatchingConfig | None = None):
        self.anchors = np.asarray(anchors, np.float32)
        self.matching = matching or MatchingConfig()

    def _match(self, y):
        return match_anchors(
            self.anchors,
            y["boxes"],
            y["classes"],
            y.get("is_crowd"),
            **dataclasses.asdict(self.matching),
        )

    def matches(self, y: dict) -> dict:
        """{"anchor_matches": [..., N]} for padded ground truth y {"boxes", "classes",
        optionally "is_crowd"}: the input pipeline's share of the targets."""
        return {"anchor_matches": self._match(y)}

    def targets(self, y: dict) -> dict:
        """Training targets from y: passed through if already built (cls_targets, ...),
        encoded from `matches`, or matched here from padded ground truth."""
        if "cls_targets" in y:
            return y
        if "boxes" not in y or "classes" not in y:
            raise ValueError(
                "anchor targets need either cls_targets / box_targets / cls_weights / "
                f"box_weights or padded boxes / classes; got keys {sorted(y)}"
            )
        matches = y["anchor_matches"] if "anchor_matches" in y else self._match(y)
        return targets_from_matches(matches, self.anchors, y["boxes"], y["classes"])


def build_targets(
    anchors,
    gt_boxes,
    gt_classes,
    is_crowd=None,
    match_iou: float = 0.5,
    unmatched_iou: float = 0.5,
    force_match: bool = True,
    crowd_ignore_ioa: float | None = None,
) -> dict:
    """Matches anchors to ground truth and encodes the training targets.

    The defaults are those SpineNet was trained with (tensorflow/tpu and Model Garden's
    RetinaNet configs): positive at IoU >= 0.5, negative below, no ignore band, each box's
    best anchor forced positive, crowd boxes dropped. RetinaNet's paper (Lin et al.) has an
    ignore band: unmatched_iou=0.4.

    Args:
        anchors: [N, 4] (ymin, xmin, ymax, xmax) in pixels.
        gt_boxes: [..., M, 4] in the same frame; rows of class PADDING are ignored.
        gt_classes: [..., M] int class ids (>= 1), PADDING for padding.
        is_crowd: optional [..., M] bool. Crowd boxes are never matched; by default that is
            all (as in the reference code, which drops them), and the anchors over them are
            negatives like any other.
        match_iou: IoU at or above which an anchor is positive.
        unmatched_iou: IoU below which an anchor is negative; in between it is ignored.
        force_match: make each box's best anchor positive for that box, whatever its IoU and
            whichever box the anchor matched otherwise; when boxes share a best anchor, the
            first box gets it (Model Garden's BoxMatcher, force_match_for_each_col).
        crowd_ignore_ioa: when set, a non-positive anchor that lies inside a crowd box by at
            least this fraction of its own area (intersection over anchor area, as in
            Detectron; IoU against a large crowd box is tiny for small anchors) is ignored.

    Returns:
        cls_targets [..., N] int (0 for background), box_targets [..., N, 4] (zero where not
        positive), cls_weights [..., N] (1 for positives and negatives, 0 for ignored) and
        box_weights [..., N] (1 for positives).
    """
    matches = match_anchors(
        anchors,
        gt_boxes,
        gt_classes,
        is_crowd,
        match_iou,
        unmatched_iou,
        force_match,
        crowd_ignore_ioa,
    )
    return targets_from_matches(matches, anchors, gt_boxes, gt_classes)


def match_anchors(
    anchors,
    gt_boxes,
    gt_classes,
    is_crowd=None,
    match_iou: float = 0.5,
    unmatched_iou: float = 0.5,
    force_match: bool = True,
    crowd_ignore_ioa: float | None = None,
):
    """The matching half of `build_targets`: [..., N] int32, the index of each anchor's box,
    or NEGATIVE, or IGNORED. Compact (4 bytes an anchor instead of 28), so an input pipeline
    can match on the host and leave the encoding to the accelerator (`targets_from_matches`).
    """
    MatchingConfig(match_iou, unmatched_iou, force_match, crowd_ignore_ioa)  # validates
    anchors = np.asarray(anchors, np.float32) if not tf.is_tensor(anchors) else anchors
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    gt_classes = tf.cast(gt_classes, tf.int32)
    valid = gt_classes > BACKGROUND
    crowd = tf.zeros_like(valid) if is_crowd is None else tf.cast(is_crowd, tf.bool)
    matchable = valid & ~crowd

    # [..., M, N]: ground truth on the second-last axis, anchors on the last. With few boxes
    # and ~10^5 anchors this keeps the long axis innermost (vectorised), and anchor-only
    # terms are computed once, in numpy, when anchors are numpy (the input pipeline's case).
    inter, a_area = _gt_anchor_intersection(gt_boxes, anchors)
    union = box_area(gt_boxes)[..., :, None] + a_area - inter
    iou = tf.where(union > 0.0, inter / tf.maximum(union, 1e-8), 0.0)
    iou_match = tf.where(matchable[..., :, None], iou, -1.0)
    best_iou = tf.reduce_max(iou_match, axis=-2)  # [..., N]
    best_gt = tf.argmax(iou_match, axis=-2, output_type=tf.int32)
    positive = best_iou >= match_iou
    if force_match:
        num_anchors = anchors.shape[0]
        best_anchor = tf.argmax(iou_match, axis=-1, output_type=tf.int32)  # [..., M]
        # [..., M, N]: True at each matchable box's best anchor.
        forced = tf.one_hot(best_anchor, num_anchors, on_value=True, off_value=False)
        forced &= matchable[..., :, None]
        forced_gt = tf.argmax(tf.cast(forced, tf.int32), axis=-2, output_type=tf.int32)
        forced_any = tf.reduce_any(forced, axis=-2)
        best_gt = tf.where(forced_any, forced_gt, best_gt)
        positive |= forced_any
    negative = (best_iou < unmatched_iou) & ~positive
    if crowd_ignore_ioa is not None and is_crowd is not None:
        ioa = inter / tf.maximum(a_area, 1e-8)
        crowd_ioa = tf.reduce_max(tf.where((valid & crowd)[..., :, None], ioa, 0.0), axis=-2)
        negative &= crowd_ioa < crowd_ignore_ioa

    return tf.where(positive, best_gt, tf.where(negative, NEGATIVE, IGNORED))


def targets_from_matches(matches, anchors, gt_boxes, gt_classes) -> dict:
    """The encoding half of `build_targets`, from the output of `match_anchors`."""
    anchors = np.asarray(anchors, np.float32) if not tf.is_tensor(anchors) else anchors
    matches = tf.cast(matches, tf.int32)
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    gt_classes = tf.cast(gt_classes, tf.int32)
    positive = matches >= 0
    index = tf.maximum(matches, 0)
    batch_dims = len(gt_classes.shape) - 1
    matched_classes = tf.gather(gt_classes, index, batch_dims=batch_dims)
    matched_boxes = tf.gather(gt_boxes, index, batch_dims=batch_dims)
    positive_f = tf.cast(positive, tf.float32)
    return {
        "cls_targets": tf.where(positive, matched_classes, BACKGROUND),
        "box_targets": encode_boxes(matched_boxes, anchors) * positive_f[..., None],
        "cls_weights": tf.cast(matches != IGNORED, tf.float32),
        "box_weights": positive_f,
    }


def _gt_anchor_intersection(gt_boxes, anchors):
    """Intersection areas [..., M, N] of gt_boxes [..., M, 4] with anchors [N, 4], and the
    anchors' areas [N]."""
    a_ymin, a_xmin, a_ymax, a_xmax = (anchors[:, i] for i in range(4))
    a_area = (a_ymax - a_ymin) * (a_xmax - a_xmin)
    g = gt_boxes[..., :, None, :]
    inter_h = tf.maximum(tf.minimum(g[..., 2], a_ymax) - tf.maximum(g[..., 0], a_ymin), 0.0)
    inter_w = tf.maximum(tf.minimum(g[..., 3], a_xmax) - tf.maximum(g[..., 1], a_xmin), 0.0)
    return inter_h * inter_w, a_area


def retinanet_losses(
    class_logits,
    box_deltas,
    targets: dict,
    config: LossConfig | None = None,
    normalizer=None,
) -> dict:
    """Focal loss + weighted Huber loss, each summed and divided by (positives + 1).

    `normalizer` replaces (positives + 1): a training loop over several replicas passes the
    global count, so the replicas' losses sum to the loss of the whole global batch.

    class_logits [B, N, K], box_deltas [B, N, 4]. Channel 0 (background) is left out of the
    focal loss by default: as in the paper (K - 1 sigmoid outputs), a negative anchor is one
    whose K - 1 class probabilities are all pushed to zero. tensorflow/tpu and Model Garden
    keep channel 0 in the loss as a sigmoid that is never positive (their negatives are an
    all-zero one-hot); `LossConfig(train_background=True)` does the same. Either way channel 0
    is never detected, and the channel is kept so weights and parameter counts stay
    interchangeable.
    """
    config = config or LossConfig()
    class_logits = tf.cast(class_logits, tf.float32)
    box_deltas = tf.cast(box_deltas, tf.float32)
    num_classes = class_logits.shape[-1]
    if normalizer is None:
        normalizer = tf.reduce_sum(targets["box_weights"]) + 1.0
    num_positives = tf.cast(normalizer, tf.float32)
    # Background (class 0) and negatives become an all-zero row.
    labels = tf.one_hot(targets["cls_targets"], num_classes)
    labels *= tf.cast(targets["cls_targets"] > BACKGROUND, tf.float32)[..., None]
    # One focal term per anchor and class: Keras averages over the last axis, here of size 1.
    focal = keras.losses.binary_focal_crossentropy(
        labels[..., None],
        class_logits[..., None],
        apply_class_balancing=True,
        alpha=config.focal_alpha,
        gamma=config.focal_gamma,
        from_logits=True,
    )
    weights = targets["cls_weights"][..., None]
    if not config.train_background:
        # A mask, not a slice of the logits: the gradient of a slice is a strided copy of
        # the whole [B, N, K] tensor (3% of a 49S training step at 640 px on CPU).
        weights *= tf.one_hot(0, num_classes, on_value=0.0, off_value=1.0)
    huber = keras.losses.huber(targets["box_targets"], box_deltas, delta=config.huber_delta)
    cls_loss = tf.reduce_sum(focal * weights) / num_positives
    box_loss = tf.reduce_sum(huber * targets["box_weights"]) / num_positives
    return {
        "cls_loss": cls_loss,
        "box_loss": box_loss,
        "total_loss": cls_loss + config.box_loss_weight * box_loss,
    }
