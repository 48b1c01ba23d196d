"""Training targets of Mask R-CNN (He et al. 2017) with static shapes: RPN anchor labels,
the balanced ROI sampler, Fast R-CNN box targets and mask targets.

Sampling is random but stateless: every function takes a seed, [2] int for the batch or
[B, 2] one per image (the data pipeline's per-element seeds: then an image's sample does not
depend on the batch it shares or the replica that draws it), so a seeded run repeats and the
ops compile with XLA. Samplers pick exact counts with top_k on random keys
instead of boolean masks (tensorflow/tpu's static-shape trick).
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from spinenet_tf.ops.boxes import box_area, encode_boxes, pairwise_iou
from spinenet_tf.ops.proposals import ROI_BOX_WEIGHTS
from spinenet_tf.ops.roi_align import crop_mask_targets
from spinenet_tf.ops.targets import BACKGROUND, match_anchors, targets_from_matches


@dataclasses.dataclass(frozen=True)
class RPNTargetConfig:
    """RPN anchor labels (Faster R-CNN): positive at IoU >= match_iou (and each box's best
    anchor), negative below unmatched_iou, `num_samples` anchors per image of which at most
    `positive_fraction` positive."""

    match_iou: float = 0.7
    unmatched_iou: float = 0.3
    num_samples: int = 256
    positive_fraction: float = 0.5

    def __post_init__(self):
        _check_sampling(self.num_samples, self.positive_fraction)
        if not 0.0 <= self.unmatched_iou <= self.match_iou <= 1.0:
            raise ValueError(f"need 0 <= unmatched_iou <= match_iou <= 1, got {self}")


@dataclasses.dataclass(frozen=True)
class ROISamplerConfig:
    """Second-stage ROI sampling (Fast R-CNN; tensorflow/tpu and Model Garden's values):
    ground truth appended to the proposals (mix_gt_boxes), `num_samples` ROIs per image, at
    most `foreground_fraction` foreground (IoU >= foreground_iou), background IoU in
    [background_iou_low, background_iou_high); the first `num_masks` samples (the
    foreground ones) train the mask head."""

    num_samples: int = 512
    foreground_fraction: float = 0.25
    foreground_iou: float = 0.5
    background_iou_high: float = 0.5
    background_iou_low: float = 0.0
    mix_gt_boxes: bool = True
    num_masks: int = 128

    def __post_init__(self):
        _check_sampling(self.num_samples, self.foreground_fraction)
        if not 0 < self.num_masks <= self.num_samples:
            raise ValueError(f"num_masks {self.num_masks} must be in [1, num_samples]")
        if not self.background_iou_low <= self.background_iou_high <= self.foreground_iou:
            raise ValueError(f"need background_iou_low <= _high <= foreground_iou, got {self}")


def _check_sampling(num_samples, fraction):
    if num_samples < 1 or not 0.0 < fraction <= 1.0:
        raise ValueError(
            f"num_samples ({num_samples}) must be >= 1 and the positive fraction ({fraction}) "
            "in (0, 1]"
        )


def balanced_sample(positive, negative, num_samples: int, positive_fraction: float, seed):
    """A random sample of exactly `num_samples` of N entries per image, N >= num_samples.

    positive, negative: [B, N] bool (disjoint). Up to int(num_samples * positive_fraction)
    positives come first, drawn at random; the rest are negatives, drawn at random; when
    negatives run short, other entries fill the slots (neither positive nor negative first,
    then unsampled positives), as Model Garden's static sampler does.

    Returns indices [B, num_samples] int32 (distinct) and their kind [B, num_samples]:
    1 for a sampled positive, 0 for a negative, -1 for a filler.
    """
    num = positive.shape[1]
    if num < num_samples:
        raise ValueError(f"cannot sample {num_samples} of {num} entries")
    batch = tf.shape(positive)[0]
    keys = uniform_keys(seed, batch, num)
    max_pos = max(1, int(num_samples * positive_fraction))
    pos_keys, pos_idx = tf.math.top_k(tf.where(positive, keys, -1.0), k=max_pos)
    pos_taken = pos_keys >= 0.0
    num_pos = tf.reduce_sum(tf.cast(pos_taken, tf.int32), axis=1)
    taken = _scatter_mask(pos_idx, pos_taken, num)
    # One ranking for the remaining slots: negatives, then fillers; sampled positives last,
    # which N >= num_samples keeps out of reach.
    tier = tf.where(negative, 3.0, tf.where(positive, 1.0, 2.0))
    _, rest_idx = tf.math.top_k(tf.where(taken, -1.0, tier + keys), k=num_samples)
    slot = tf.broadcast_to(tf.range(num_samples)[None, :], [batch, num_samples])
    first = slot < num_pos[:, None]
    indices = tf.where(
        first,
        tf.gather(pos_idx, tf.minimum(slot, max_pos - 1), batch_dims=1),
        tf.gather(rest_idx, tf.maximum(slot - num_pos[:, None], 0), batch_dims=1),
    )
    kind = tf.where(first, 1, tf.where(tf.gather(negative, indices, batch_dims=1), 0, -1))
    return indices, kind


def uniform_keys(seed, batch, num: int):
    """Uniform [0, 1) keys [batch, num] from one seed [2] or from per-row seeds [batch, 2]."""
    seed = tf.cast(seed, tf.int64)
    if seed.shape.rank == 1:
        return tf.random.stateless_uniform([batch, num], seed)
    return tf.map_fn(
        lambda s: tf.random.stateless_uniform([num], s),
        seed,
        fn_output_signature=tf.TensorSpec([num], tf.float32),
    )


def salted(seed, salt: int):
    """A different stream of the same seed ([2] or [B, 2]) for each consumer."""
    seed = tf.cast(seed, tf.int64)
    return seed + tf.constant([0, salt], tf.int64)


def _scatter_mask(indices, keep, size):
    """[B, size] bool, True at indices [B, K] where keep [B, K]."""
    batch = tf.shape(indices)[0]
    rows = tf.broadcast_to(tf.range(batch)[:, None], tf.shape(indices))
    at = tf.stack([rows, indices], axis=-1)
    return tf.scatter_nd(at, tf.cast(keep, tf.int32), [batch, size]) > 0


def rpn_targets(anchors, gt_boxes, gt_classes, seed, config: RPNTargetConfig | None = None):
    """RPN labels for padded ground truth [B, M, 4] / [B, M] (class -1 pads) over anchors
    [N, 4] (one image: unbatched [M, 4] / [M] works too).

    Returns {"rpn_score_targets": [B, N] int32, 1 sampled positive, 0 sampled negative, -1
    not sampled; "rpn_box_targets": [B, N, 4] (unweighted deltas, zero unless positive);
    "rpn_box_weights": [B, N], 1 for sampled positives}.
    """
    config = config or RPNTargetConfig()
    batched = len(gt_classes.shape) == 2
    if not batched:
        gt_boxes, gt_classes = gt_boxes[None], gt_classes[None]
    matches = match_anchors(
        anchors, gt_boxes, gt_classes, None, config.match_iou, config.unmatched_iou
    )
    # Every box is "object" to the RPN: its class only marks padding.
    objects = tf.where(tf.cast(gt_classes, tf.int32) > BACKGROUND, 1, -1)
    dense = targets_from_matches(matches, anchors, gt_boxes, objects)
    positive = dense["box_weights"] > 0
    negative = (dense["cls_weights"] > 0) & ~positive
    indices, kind = balanced_sample(
        positive, negative, config.num_samples, config.positive_fraction, seed
    )
    sampled = _scatter_mask(indices, kind >= 0, positive.shape[1])
    out = {
        "rpn_score_targets": tf.where(sampled, tf.cast(positive, tf.int32), -1),
        "rpn_box_targets": dense["box_targets"],
        "rpn_box_weights": tf.cast(sampled & positive, tf.float32),
    }
    return out if batched else {k: v[0] for k, v in out.items()}


def sample_rois(proposals, gt_boxes, gt_classes, seed, config: ROISamplerConfig | None = None):
    """Samples `num_samples` training ROIs per image and their Fast R-CNN targets.

    proposals [B, P, 4] (zero rows are padding, never sampled unless nothing else is
    left), padded ground truth gt_boxes [B, M, 4] and gt_classes [B, M] (-1 pads). A ROI's
    target is the ground truth it overlaps most, if IoU >= foreground_iou, else background.

    Returns {"rois": [B, K, 4], "classes": [B, K] int32 (0 background), "gt_indices": [B, K]
    (-1 background), "box_targets": [B, K, 4] (weighted [10, 10, 5, 5], zero for
    background)}, foreground samples first. No gradient flows through any of it.
    """
    config = config or ROISamplerConfig()
    proposals = tf.stop_gradient(tf.cast(proposals, tf.float32))
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    gt_classes = tf.cast(gt_classes, tf.int32)
    valid_gt = gt_classes > BACKGROUND
    boxes, valid = proposals, box_area(proposals) > 0.0
    if config.mix_gt_boxes:
        boxes = tf.concat([boxes, gt_boxes], axis=1)
        valid = tf.concat([valid, valid_gt], axis=1)
    iou = tf.where(valid_gt[:, None, :], pairwise_iou(boxes, gt_boxes), -1.0)
    best_iou = tf.reduce_max(iou, axis=-1)
    best_gt = tf.argmax(iou, axis=-1, output_type=tf.int32)
    positive = valid & (best_iou >= config.foreground_iou)
    negative = (
        valid & (best_iou >= config.background_iou_low) & (best_iou < config.background_iou_high)
    )
    indices, _ = balanced_sample(
        positive, negative, config.num_samples, config.foreground_fraction, seed
    )
    rois = tf.gather(boxes, indices, batch_dims=1)
    foreground = tf.gather(positive, indices, batch_dims=1)
    gt_indices = tf.where(foreground, tf.gather(best_gt, indices, batch_dims=1), -1)
    safe = tf.maximum(gt_indices, 0)
    matched = tf.gather(gt_boxes, safe, batch_dims=1)
    targets = encode_boxes(matched, rois) * tf.constant(ROI_BOX_WEIGHTS)
    return {
        "rois": rois,
        "classes": tf.where(foreground, tf.gather(gt_classes, safe, batch_dims=1), BACKGROUND),
        "gt_indices": gt_indices,
        "box_targets": tf.where(foreground[..., None], targets, 0.0),
    }


def mask_targets(samples: dict, gt_boxes, gt_masks, num_masks: int, mask_size: int = 28):
    """Mask targets of the first `num_masks` samples of `sample_rois` (its foreground,
    padded with background samples, whose class 0 weighs them out of the loss).

    gt_masks [B, M, H, W] are each box's mask cropped to the box (the data pipeline's 112 x
    112 crops). Returns {"mask_rois": [B, num_masks, 4], "mask_classes": [B, num_masks],
    "mask_targets": [B, num_masks, mask_size, mask_size] soft float32}.
    """
    rois = samples["rois"][:, :num_masks]
    safe = tf.maximum(samples["gt_indices"][:, :num_masks], 0)
    masks = tf.gather(gt_masks, safe, batch_dims=1)
    boxes = tf.gather(tf.cast(gt_boxes, tf.float32), safe, batch_dims=1)
    return {
        "mask_rois": rois,
        "mask_classes": samples["classes"][:, :num_masks],
        "mask_targets": tf.stop_gradient(crop_mask_targets(masks, boxes, rois, mask_size)),
    }
