"""Box coding and IoU for (ymin, xmin, ymax, xmax) boxes, in TensorFlow for tf.data and XLA."""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

# Largest log-scale delta decoded, as in Detectron and Model Garden: exp() stays finite for
# any network output.
BBOX_XFORM_CLIP = math.log(1000.0 / 16.0)
_EPSILON = 1e-8


def _center_size(boxes):
    if isinstance(boxes, np.ndarray):  # constant anchors: computed once, not in the graph
        ymin, xmin, ymax, xmax = (boxes[..., i] for i in range(4))
    else:
        ymin, xmin, ymax, xmax = tf.unstack(boxes, axis=-1)
    h, w = ymax - ymin, xmax - xmin
    return ymin + 0.5 * h, xmin + 0.5 * w, h, w


def encode_boxes(boxes, anchors):
    """Regression targets (dy, dx, dh, dw) of `boxes` relative to `anchors` (broadcasting)."""
    yc, xc, h, w = _center_size(boxes)
    ayc, axc, ah, aw = _center_size(anchors)
    ah, aw, h, w = ah + _EPSILON, aw + _EPSILON, h + _EPSILON, w + _EPSILON
    return tf.stack(
        [(yc - ayc) / ah, (xc - axc) / aw, tf.math.log(h / ah), tf.math.log(w / aw)], axis=-1
    )


def decode_boxes(deltas, anchors):
    """Inverse of encode_boxes; log-scale deltas are clipped at BBOX_XFORM_CLIP."""
    deltas = tf.cast(deltas, anchors.dtype)
    dy, dx, dh, dw = tf.unstack(deltas, axis=-1)
    dh = tf.minimum(dh, BBOX_XFORM_CLIP)
    dw = tf.minimum(dw, BBOX_XFORM_CLIP)
    ayc, axc, ah, aw = _center_size(anchors)
    yc, xc = dy * ah + ayc, dx * aw + axc
    h, w = tf.exp(dh) * ah, tf.exp(dw) * aw
    ymin, xmin = yc - 0.5 * h, xc - 0.5 * w
    return tf.stack([ymin, xmin, ymin + h, xmin + w], axis=-1)


def box_area(boxes):
    ymin, xmin, ymax, xmax = tf.unstack(boxes, axis=-1)
    return tf.maximum(ymax - ymin, 0.0) * tf.maximum(xmax - xmin, 0.0)


def pairwise_iou(boxes1, boxes2):
    """IoU matrix [..., N, M] of boxes1 [..., N, 4] and boxes2 [..., M, 4]."""
    b1 = boxes1[..., :, None, :]
    b2 = boxes2[..., None, :, :]
    inter_h = tf.maximum(
        tf.minimum(b1[..., 2], b2[..., 2]) - tf.maximum(b1[..., 0], b2[..., 0]), 0.0
    )
    inter_w = tf.maximum(
        tf.minimum(b1[..., 3], b2[..., 3]) - tf.maximum(b1[..., 1], b2[..., 1]), 0.0
    )
    inter = inter_h * inter_w
    union = box_area(boxes1)[..., :, None] + box_area(boxes2)[..., None, :] - inter
    return tf.where(union > 0.0, inter / tf.maximum(union, _EPSILON), 0.0)
