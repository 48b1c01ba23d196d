"""Mask R-CNN losses (He et al. 2017, Sec. 3), normalised as tensorflow/tpu and Model Garden
(`losses/maskrcnn_losses.py`) do."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

# Added to every positive count before dividing, so that a batch without positives gives a
# zero loss instead of 0 / 0 (the reference's constant).
_COUNT_EPSILON = 0.01


@dataclasses.dataclass(frozen=True)
class RCNNLossConfig:
    """Huber deltas of the RPN (1/9) and Fast R-CNN (1) box losses and the weight of each
    term in the total (all 1 in the reference)."""

    rpn_huber_delta: float = 1.0 / 9.0
    box_huber_delta: float = 1.0
    rpn_score_weight: float = 1.0
    rpn_box_weight: float = 1.0
    class_weight: float = 1.0
    box_weight: float = 1.0
    mask_weight: float = 1.0

    def __post_init__(self):
        if self.rpn_huber_delta <= 0 or self.box_huber_delta <= 0:
            raise ValueError(f"Huber deltas must be > 0, got {self}")


def _huber(targets, predictions, delta):
    """Elementwise Huber loss: Keras's, on a trailing axis of one so that it averages
    nothing away."""
    return keras.losses.huber(targets[..., None], predictions[..., None], delta=delta)


def _identity(x):
    return x


def rpn_losses(
    scores, deltas, targets: dict, level_sizes, num_samples: int, config, global_sum=None
):
    """RPN objectness and box losses.

    scores [B, N] logits and deltas [B, N, 4] over all levels' anchors (`level_sizes`
    each); targets as `rcnn_targets.rpn_targets`. The score loss is the sigmoid cross-entropy
    of the sampled anchors divided by B * num_samples; the box loss is, per level, the Huber
    loss over sampled positive coordinates divided by their number (+0.01), summed over
    levels, so that each level weighs the same. `global_sum` (see `maskrcnn_losses`) makes
    every divisor the global batch's.
    """
    global_sum = global_sum or _identity
    scores = tf.cast(scores, tf.float32)
    labels = targets["rpn_score_targets"]
    ce = tf.nn.sigmoid_cross_entropy_with_logits(
        labels=tf.cast(labels > 0, tf.float32), logits=scores
    )
    batch = global_sum(tf.cast(tf.shape(scores)[0], tf.float32))
    score_loss = tf.reduce_sum(ce * tf.cast(labels >= 0, tf.float32)) / (batch * num_samples)
    weights = tf.cast(targets["rpn_box_weights"], tf.float32)
    per_box = tf.reduce_sum(
        _huber(targets["rpn_box_targets"], tf.cast(deltas, tf.float32), config.rpn_huber_delta),
        axis=-1,
    )
    box_loss = 0.0
    bounds = np.cumsum([0, *level_sizes])
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        w = weights[:, start:end]
        box_loss += tf.reduce_sum(per_box[:, start:end] * w) / (
            4.0 * global_sum(tf.reduce_sum(w)) + _COUNT_EPSILON
        )
    return score_loss, box_loss


def maskrcnn_losses(
    outputs: dict,
    rpn_targets: dict,
    level_sizes,
    rpn_num_samples: int = 256,
    config: RCNNLossConfig | None = None,
    global_sum=None,
) -> dict:
    """All Mask R-CNN losses from the training outputs of `MaskRCNN` (predictions and the
    sampled second-stage targets) and the RPN targets.

    - class: softmax cross-entropy, mean over all sampled ROIs;
    - box: Huber loss of the ground-truth class's 4 outputs, summed over foreground ROIs and
      divided by their coordinate count (+0.01);
    - mask: per-pixel sigmoid cross-entropy with the (soft) targets, over foreground masks,
      divided by their pixel count (+0.01).

    Returns rpn_score_loss, rpn_box_loss, class_loss, box_loss, mask_loss and their
    weighted sum total_loss. With `global_sum(x)` (a sum over the replicas, run in each
    replica's context) every count that divides is the global batch's, so the replicas'
    losses sum to the loss of that batch on one device, whatever the replica count.
    """
    config = config or RCNNLossConfig()
    global_sum = global_sum or _identity
    rpn_score, rpn_box = rpn_losses(
        outputs["rpn_scores"],
        outputs["rpn_deltas"],
        rpn_targets,
        level_sizes,
        rpn_num_samples,
        config,
        global_sum,
    )
    class_logits = tf.cast(outputs["class_logits"], tf.float32)
    num_classes = class_logits.shape[-1]
    classes = tf.cast(outputs["classes"], tf.int32)
    class_ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=classes, logits=class_logits)
    class_loss = tf.reduce_sum(class_ce) / global_sum(tf.cast(tf.size(class_ce), tf.float32))
    # The ground-truth class's deltas, by a one-hot contraction (no gather: XLA-friendly).
    deltas = tf.cast(outputs["box_deltas"], tf.float32)
    deltas = tf.reshape(deltas, [-1, classes.shape[1], num_classes, 4])
    deltas = tf.einsum("bkcd,bkc->bkd", deltas, tf.one_hot(classes, num_classes))
    foreground = tf.cast(classes > 0, tf.float32)
    box = tf.reduce_sum(_huber(outputs["box_targets"], deltas, config.box_huber_delta), -1)
    box_loss = tf.reduce_sum(box * foreground) / (
        4.0 * global_sum(tf.reduce_sum(foreground)) + _COUNT_EPSILON
    )
    mask_logits = tf.cast(outputs["mask_logits"], tf.float32)
    mask_fg = tf.cast(outputs["mask_classes"] > 0, tf.float32)
    pixels = float(np.prod(mask_logits.shape[2:]))
    bce = tf.nn.sigmoid_cross_entropy_with_logits(
        labels=tf.cast(outputs["mask_targets"], tf.float32), logits=mask_logits
    )
    mask_loss = tf.reduce_sum(tf.reduce_sum(bce, axis=[2, 3]) * mask_fg) / (
        pixels * global_sum(tf.reduce_sum(mask_fg)) + _COUNT_EPSILON
    )
    losses = {
        "rpn_score_loss": rpn_score,
        "rpn_box_loss": rpn_box,
        "class_loss": class_loss,
        "box_loss": box_loss,
        "mask_loss": mask_loss,
    }
    weights = {
        "rpn_score_loss": config.rpn_score_weight,
        "rpn_box_loss": config.rpn_box_weight,
        "class_loss": config.class_weight,
        "box_loss": config.box_weight,
        "mask_loss": config.mask_weight,
    }
    losses["total_loss"] = tf.add_n([weights[k] * v for k, v in losses.items()])
    return losses
