"""RetinaNet detection decoding: pre-NMS top-k, box decoding, clipping and class-aware NMS.

Static shapes throughout, so it runs inside XLA and on TPUs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from spinenet_tf.ops.boxes import decode_boxes


@dataclasses.dataclass(frozen=True)
class DetectionConfig:
    """Decoding settings.

    max_detections, score_threshold and iou_threshold are Model Garden's RetinaNet defaults;
    the default pre-NMS selection is Detectron's, not Model Garden's:
    - pre_nms="per_level" (default): each level's top `pre_nms_top_k` (anchor, class) pairs
      by score, as in Detectron's RetinaNet (1000 per level).
    - pre_nms="per_class": each class's top `pre_nms_top_k` anchors over all levels, as
      Model Garden's v2 decoder (`_select_top_k_scores`); pre_nms_top_k=5000 is its default.

    A detection needs a score > score_threshold. NMS is greedy and per class (over all classes
    if class_agnostic): it suppresses a box whose IoU with a kept box is >= iou_threshold.
    Equal scores go to the lower class, then the lower anchor index (Model Garden's order).
    nms="padded" (default) is the static-shape NMS below, which compiles with XLA;
    nms="combined" runs the same NMS in TF's CPU kernel, combined_non_max_suppression (not
    XLA-compilable, not class_agnostic; equal scores may break differently).
    """

    max_detections: int = 100
    pre_nms_top_k: int = 1000
    score_threshold: float = 0.05
    iou_threshold: float = 0.5
    class_agnostic: bool = False
    nms: str = "padded"
    pre_nms: str = "per_level"

    def __post_init__(self):
        if self.nms not in ("padded", "combined"):
            raise ValueError(f"nms {self.nms!r} must be 'padded' or 'combined'")
        if self.pre_nms not in ("per_level", "per_class"):
            raise ValueError(f"pre_nms {self.pre_nms!r} must be 'per_level' or 'per_class'")
        if self.nms == "combined" and self.class_agnostic:
            raise ValueError("class_agnostic decoding needs nms='padded'")
        if self.max_detections < 1 or self.pre_nms_top_k < 1:
            raise ValueError(f"max_detections and pre_nms_top_k must be >= 1, got {self}")
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold {self.iou_threshold} must be in (0, 1]")


def generate_detections(
    class_logits,
    box_deltas,
    anchors,
    level_sizes,
    image_hw,
    config: DetectionConfig = DetectionConfig(),
    valid_hw=None,
) -> dict:
    """Turns raw outputs into at most `max_detections` boxes per image.

    Args:
        class_logits: [B, N, K]; channel 0 is background and never detected.
        box_deltas: [B, N, 4].
        anchors: [N, 4] in pixels, levels concatenated.
        level_sizes: number of anchors of each level, in order (they sum to N).
        image_hw: (height, width) of the network input.
        config: see DetectionConfig.
        valid_hw: optional [B, 2] (height, width) of each image inside the padded input
            (`spinenet_tf.ops.geometry.scaled_image_hw` of its image_info); None means the whole
            input. Boxes are clipped to it (and to image_hw) before NMS, so that NMS compares
            what is left inside the image. (Model Garden clips to its image_info[:, 1, :],
            which holds the desired output size, i.e. the whole square canvas, despite its
            docstring.)

    Returns:
        boxes [B, D, 4] (ymin, xmin, ymax, xmax) in input pixels, scores [B, D], classes
        [B, D] int32, num_detections [B] int32; rows are sorted by score and rows past
        num_detections are zero.
    """
    class_logits = tf.cast(class_logits, tf.float32)[:, :, 1:]
    num_fg = class_logits.shape[2]
    boxes, scores, classes = _candidates(class_logits, box_deltas, anchors, level_sizes, config)
    boxes = clip_boxes(boxes, image_hw, valid_hw)
    return _detections(*_suppress(boxes, scores, classes, num_fg, config), config)


def class_specific_detections(boxes, scores, config: DetectionConfig = DetectionConfig()) -> dict:
    """Detections from per-class boxes [B, N, K, 4] (decoded, clipped) and scores [B, N, K]
    of the K foreground classes (a two-stage detector's second stage): each class's top
    `pre_nms_top_k` boxes, score > score_threshold, greedy NMS within the class (as Model
    Garden's v2 decoder); returns what `generate_detections` does, classes 1-based."""
    config = dataclasses.replace(config, pre_nms="per_class", class_agnostic=False)
    num_boxes, num_fg = scores.shape[1], scores.shape[2]
    top, box_idx, classes = _top_k_per_class(
        tf.cast(scores, tf.float32), num_boxes, config.pre_nms_top_k
    )
    # Class-major [B, K * N, 4], so that (class, box) is one flat index.
    by_class = tf.reshape(tf.transpose(boxes, [0, 2, 1, 3]), [-1, num_fg * num_boxes, 4])
    picked = tf.gather(by_class, (classes - 1) * num_boxes + box_idx, batch_dims=1)
    return _detections(*_suppress(picked, top, classes, num_fg, config), config)


def non_max_suppression_padded(
    boxes, scores, max_output_size: int, iou_threshold: float, groups=None
):
    """Greedy NMS of boxes [B, M, 4] by scores [B, M] with static shapes: the indices
    [B, max_output_size] of the kept boxes, best first, and their mask [B, max_output_size].

    A box is suppressed by a kept box of its own group (groups [B, M] int; None: one group)
    with IoU >= iou_threshold; boxes scoring -inf are never kept.
    """
    config = DetectionConfig(
        max_detections=max_output_size,
        iou_threshold=iou_threshold,
        score_threshold=-np.inf,
        class_agnostic=groups is None,
    )
    groups = tf.zeros_like(scores, tf.int32) if groups is None else groups
    return _greedy_nms(boxes, scores, groups, config)


def _detections(kept_boxes, kept_scores, kept_classes, num, config: DetectionConfig) -> dict:
    """The detections dict of NMS output; rows past num_detections zeroed."""
    valid = tf.range(config.max_detections)[None, :] < num[:, None]
    valid_f = tf.cast(valid, tf.float32)
    return {
        "boxes": kept_boxes * valid_f[..., None],
        "scores": kept_scores * valid_f,
        "classes": tf.where(valid, kept_classes, 0),
        "num_detections": tf.cast(num, tf.int32),
    }


def _candidates(class_logits, box_deltas, anchors, level_sizes, config):
    """The pre-NMS selection, decoded: boxes [B, C, 4], scores [B, C], classes [B, C] (1-based).

    Candidates come out so that, among equal scores, the lower index has the lower class,
    then the lower anchor: the NMS breaks ties by index, and this is Model Garden's order.
    """
    box_deltas = tf.cast(box_deltas, tf.float32)
    anchors = tf.convert_to_tensor(anchors, tf.float32)
    if config.pre_nms == "per_class":
        logits, anchor_idx, classes = _top_k_per_class(
            class_logits, sum(level_sizes), config.pre_nms_top_k
        )
    else:
        logits, anchor_idx, classes = top_k_per_level(
            class_logits, level_sizes, config.pre_nms_top_k
        )
    boxes = decode_boxes(
        tf.gather(box_deltas, anchor_idx, batch_dims=1), tf.gather(anchors, anchor_idx)
    )
    return boxes, tf.sigmoid(logits), classes


def clip_boxes(boxes, image_hw, valid_hw=None):
    """Boxes [B, C, 4] clipped to the input (image_hw) and, when given, to each image's own
    area valid_hw [B, 2]."""
    hw = tf.constant([float(image_hw[0]), float(image_hw[1])])
    if valid_hw is not None:
        hw = tf.minimum(tf.cast(valid_hw, tf.float32), hw)
    limits = tf.concat([hw, hw], axis=-1)[..., None, :]  # [1, 4] or [B, 1, 4]
    return tf.maximum(tf.minimum(boxes, limits), 0.0)


def _suppress(boxes, scores, classes, num_fg, config):
    """NMS of the candidates: (boxes, scores, classes) [B, max_detections, ...] sorted by
    score, and the number kept [B]; rows past it are unspecified."""
    if config.nms == "combined":
        return _combined_nms(boxes, scores, classes, num_fg, config)
    if config.pre_nms == "per_class" and not config.class_agnostic:
        kept, valid = _greedy_nms_by_class(boxes, scores, num_fg, config)
    else:
        kept, valid = _greedy_nms(boxes, scores, classes, config)
    num = tf.reduce_sum(tf.cast(valid, tf.int32), axis=1)
    return (
        tf.gather(boxes, kept, batch_dims=1),
        tf.gather(scores, kept, batch_dims=1),
        tf.gather(classes, kept, batch_dims=1),
        num,
    )


def top_k_per_level(logits, level_sizes, k):
    """Each level's top k (anchor, class) pairs, ordered by class, then anchor: logits, anchor
    indices, classes [B, M]."""
    batch, num_fg = tf.shape(logits)[0], logits.shape[-1]
    values, anchor_idx, classes = [], [], []
    start = 0
    for size in level_sizes:
        level = tf.reshape(logits[:, start : start + size], [batch, size * num_fg])
        # Top-k on logits: sigmoid is monotonic, so only the k survivors need it.
        top, idx = tf.math.top_k(level, k=min(k, size * num_fg), sorted=False)
        values.append(top)
        anchor_idx.append(idx // num_fg + start)
        classes.append(idx % num_fg + 1)
        start += size
    anchor_idx, classes = tf.concat(anchor_idx, 1), tf.concat(classes, 1)
    num_anchors = sum(level_sizes)
    if (num_fg + 1) * num_anchors > np.iinfo(np.int32).max:
        raise ValueError(f"{num_anchors} anchors x {num_fg} classes overflow the int32 sort key")
    order = tf.argsort(classes * num_anchors + anchor_idx, axis=1)
    return tuple(
        tf.gather(t, order, batch_dims=1) for t in (tf.concat(values, 1), anchor_idx, classes)
    )


def _top_k_per_class(logits, num_anchors, k):
    """Each class's top k anchors over all levels (Model Garden's v2 selection), flattened
    class-major, each class's by score (ties: lower anchor first): logits, anchor indices,
    classes [B, K * k]."""
    batch, num_fg = tf.shape(logits)[0], logits.shape[-1]
    k = min(k, num_anchors)
    top, anchor_idx = tf.math.top_k(tf.transpose(logits, [0, 2, 1]), k=k, sorted=True)
    classes = tf.broadcast_to(tf.range(1, num_fg + 1)[None, :, None], [batch, num_fg, k])
    return tuple(tf.reshape(t, [batch, num_fg * k]) for t in (top, anchor_idx, classes))


def _with_area(boxes):
    """[..., 5]: ymin, xmin, ymax, xmax, area."""
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    return tf.concat([boxes, area[..., None]], axis=-1)


def _overlaps(boxes, chosen, threshold):
    """IoU >= threshold [B, M] between boxes and a chosen one, both (ymin, xmin, ymax, xmax,
    area) with each [B, M] and [B, 1] respectively, computed on the boxes themselves: exact
    to float32 rounding."""
    ymin, xmin, ymax, xmax, area = boxes
    cymin, cxmin, cymax, cxmax, carea = chosen
    inter = tf.nn.relu(tf.minimum(ymax, cymax) - tf.maximum(ymin, cymin)) * tf.nn.relu(
        tf.minimum(xmax, cxmax) - tf.maximum(xmin, cxmin)
    )
    # Zero-area boxes overlap nothing, as in TF's NMS kernels.
    return tf.math.divide_no_nan(inter, area + carea - inter) >= threshold


def _greedy_loop(step, live, batch, d):
    """Runs step(*state) -> (ok [B, 1], index [B, 1], *state) from state `live` for up to d
    slots; returns the indices [B, d] and their mask. Stops once every image has run out."""
    slots = tf.range(d)[None, :]

    def body(i, more, kept, valid, *state):
        ok, index, *state = step(*state)
        slot = slots == i
        kept, valid = tf.where(slot, index, kept), tf.where(slot, ok, valid)
        return (i + 1, tf.reduce_any(ok), kept, valid, *state)

    out = tf.while_loop(
        lambda i, more, *_: more & (i < d),
        body,
        (
            tf.constant(0),
            tf.constant(True),
            tf.zeros([batch, d], tf.int32),
            tf.zeros([batch, d], tf.bool),
            *live,
        ),
        maximum_iterations=d,
    )
    return out[2], out[3]


def _greedy_nms(boxes, scores, classes, config: DetectionConfig):
    """Greedy NMS of candidates [B, M]: indices [B, D] of the kept ones, and their mask.

    Each step keeps, per image, the best live candidate (equal scores: the lowest index, as
    top_k does), then kills it and every live candidate of its class (of any class if
    class_agnostic) with IoU >= iou_threshold. That is greedy NMS run on each class separately
    and merged by score, at D * M IoUs per image. Offsetting each class's boxes into a region
    of its own, so that one class-agnostic NMS does the job, is cheaper but inexact: at 640 px
    it moves class 90 to ~58k px, where float32 spacing (0.004 px) changes an 8-px box pair's
    IoU by up to 1e-3.
    """
    # Classes ride along as float32 (exact below 2**24) so that one gather fetches the pick.
    attrs = tf.concat([_with_area(boxes), tf.cast(classes, tf.float32)[..., None]], axis=-1)
    *coords, box_classes = tf.unstack(attrs, axis=-1)
    positions = tf.range(scores.shape[1])[None, :]

    def step(live):
        best, pick = tf.math.top_k(live, k=1)
        *chosen, chosen_class = tf.unstack(tf.gather(attrs, pick, batch_dims=1), axis=-1)
        dead = _overlaps(coords, chosen, config.iou_threshold)
        if not config.class_agnostic:
            dead &= box_classes == chosen_class
        dead |= positions == pick
        return best > -np.inf, pick, tf.where(dead, -np.inf, live)

    live = tf.where(scores > config.score_threshold, scores, -np.inf)
    return _greedy_loop(step, [live], tf.shape(scores)[0], config.max_detections)


def _greedy_nms_by_class(boxes, scores, num_classes, config: DetectionConfig):
    """_greedy_nms for the class-major candidates [B, K * k] of per-class selection.

    A kept box only suppresses boxes of its own class, so each step reads and rewrites one
    class's k candidates instead of all K * k (450k at Model Garden's k=5000 and K=90).
    """
    batch = tf.shape(scores)[0]
    k = scores.shape[1] // num_classes
    attrs = tf.reshape(_with_area(boxes), [batch, num_classes, k, 5])
    live = tf.where(scores > config.score_threshold, scores, -np.inf)
    live = tf.reshape(live, [batch, num_classes, k])
    positions = tf.range(k)[None, :]
    batch_ids = tf.range(batch)[:, None]

    def step(live, class_best):
        # Equal scores: lower class, then lower index (= lower anchor), as in _greedy_nms.
        best, c = tf.math.top_k(class_best, k=1)
        row = tf.gather(live, c, batch_dims=1)[:, 0]
        row_attrs = tf.gather(attrs, c, batch_dims=1)[:, 0]
        pick = tf.math.top_k(row, k=1).indices
        chosen = tf.unstack(tf.gather(row_attrs, pick, batch_dims=1), axis=-1)
        dead = _overlaps(tf.unstack(row_attrs, axis=-1), chosen, config.iou_threshold)
        row = tf.where(dead | (positions == pick), -np.inf, row)
        at = tf.concat([batch_ids, c], axis=1)
        live = tf.tensor_scatter_nd_update(live, at, row)
        class_best = tf.tensor_scatter_nd_update(class_best, at, tf.reduce_max(row, axis=1))
        return best > -np.inf, c * k + pick, live, class_best

    return _greedy_loop(step, [live, tf.reduce_max(live, axis=2)], batch, config.max_detections)


def _combined_nms(boxes, scores, classes, num_fg, config: DetectionConfig):
    """The same NMS through tf.image.combined_non_max_suppression (CPU kernel), which runs it
    per class on [B, M, K] scores: each candidate scores -inf in the other classes."""
    if config.pre_nms == "per_class":
        # Candidates are class-major [B, K * k]: give the kernel its [B, k, K] layout.
        batch = tf.shape(scores)[0]
        nms_scores = tf.transpose(tf.reshape(scores, [batch, num_fg, -1]), [0, 2, 1])
        nms_boxes = tf.transpose(tf.reshape(boxes, [batch, num_fg, -1, 4]), [0, 2, 1, 3])
    else:
        mine = tf.one_hot(classes - 1, num_fg, on_value=True, off_value=False)
        nms_scores = tf.where(mine, scores[..., None], -np.inf)
        nms_boxes = boxes[:, :, None, :]
    out = tf.image.combined_non_max_suppression(
        nms_boxes,
        nms_scores,
        config.max_detections,
        config.max_detections,
        # The kernel suppresses at IoU > threshold; its IoU is float32, so the next float32
        # below the threshold gives >=.
        float(np.nextafter(np.float32(config.iou_threshold), np.float32(-np.inf))),
        config.score_threshold,
        pad_per_class=False,
        clip_boxes=False,
    )
    classes = tf.cast(out.nmsed_classes, tf.int32) + 1
    return out.nmsed_boxes, out.nmsed_scores, classes, out.valid_detections
