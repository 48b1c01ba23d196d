"""RetinaNet detection decoding: per-level top-k, box decoding and batched NMS.

Static shapes throughout, so it runs inside XLA and on TPUs.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from spinenet_tf.ops.boxes import decode_boxes


@dataclasses.dataclass(frozen=True)
class DetectionConfig:
    """Decoding settings; the defaults are Model Garden's RetinaNet ones."""

    max_detections: int = 100
    pre_nms_top_k: int = 1000  # candidates per level, over all (anchor, class) pairs
    score_threshold: float = 0.05
    iou_threshold: float = 0.5
    class_agnostic: bool = False
    # "padded" is TF's batched, XLA-compatible NMS; "combined" is its CPU kernel (faster
    # outside XLA on CPU; not compilable).
    nms: str = "padded"

    def __post_init__(self):
        if self.nms not in ("padded", "combined"):
            raise ValueError(f"nms {self.nms!r} must be 'padded' or 'combined'")
        if self.nms == "combined" and self.class_agnostic:
            raise ValueError("class_agnostic decoding needs nms='padded'")
        if self.max_detections < 1 or self.pre_nms_top_k < 1:
            raise ValueError(f"max_detections and pre_nms_top_k must be >= 1, got {self}")


def generate_detections(
    class_logits,
    box_deltas,
    anchors,
    level_sizes,
    image_hw,
    config: DetectionConfig = DetectionConfig(),
) -> dict:
    """Turns raw outputs into at most `max_detections` boxes per image.

    Args:
        class_logits: [B, N, K]; channel 0 is background and never detected.
        box_deltas: [B, N, 4].
        anchors: [N, 4] in pixels, levels concatenated.
        level_sizes: number of anchors of each level, in order (they sum to N).
        image_hw: (height, width) of the network input; boxes are clipped to it.

    Returns:
        boxes [B, D, 4] (ymin, xmin, ymax, xmax) in input pixels, scores [B, D], classes
        [B, D] int32, num_detections [B] int32; rows past num_detections are zero.
    """
    class_logits = tf.cast(class_logits, tf.float32)
    box_deltas = tf.cast(box_deltas, tf.float32)
    anchors = tf.convert_to_tensor(anchors, tf.float32)
    num_fg = class_logits.shape[-1] - 1
    batch = tf.shape(class_logits)[0]

    logits, anchor_idx, classes = [], [], []
    start = 0
    for size in level_sizes:
        level = tf.reshape(class_logits[:, start : start + size, 1:], [batch, size * num_fg])
        k = min(config.pre_nms_top_k, size * num_fg)
        # Top-k on logits: sigmoid is monotonic, so only the k survivors need it.
        top, idx = tf.math.top_k(level, k=k, sorted=False)
        logits.append(top)
        anchor_idx.append(idx // num_fg + start)
        classes.append(idx % num_fg + 1)
        start += size
    scores = tf.sigmoid(tf.concat(logits, axis=1))
    anchor_idx = tf.concat(anchor_idx, axis=1)
    classes = tf.concat(classes, axis=1)

    boxes = decode_boxes(
        tf.gather(box_deltas, anchor_idx, batch_dims=1), tf.gather(anchors, anchor_idx)
    )
    height, width = float(image_hw[0]), float(image_hw[1])
    boxes = tf.clip_by_value(boxes, 0.0, [height, width, height, width])
    scores = tf.where(scores >= config.score_threshold, scores, 0.0)

    # Class-aware NMS in one pass: shift each class's boxes into a region of its own.
    shift = 0.0 if config.class_agnostic else max(height, width) + 1.0
    nms_boxes = boxes + (tf.cast(classes, tf.float32) * shift)[..., None]
    if config.nms == "combined":
        out = tf.image.combined_non_max_suppression(
            nms_boxes[:, :, None, :],
            scores[:, :, None],
            config.max_detections,
            config.max_detections,
            config.iou_threshold,
            config.score_threshold,
            pad_per_class=False,
            clip_boxes=False,
        )
        num = out.valid_detections
        # Boxes lie in [0, max(H, W)] before the shift, so the shift gives the class back.
        kept_classes = tf.cast(tf.floor(out.nmsed_boxes[..., 0] / shift), tf.int32)
        kept_boxes = out.nmsed_boxes - (tf.cast(kept_classes, tf.float32) * shift)[..., None]
        kept_scores = out.nmsed_scores
    else:
        selected, num = tf.image.non_max_suppression_padded(
            nms_boxes,
            scores,
            config.max_detections,
            iou_threshold=config.iou_threshold,
            score_threshold=config.score_threshold,
            pad_to_max_output_size=True,
        )
        kept_boxes = tf.gather(boxes, selected, batch_dims=1)
        kept_scores = tf.gather(scores, selected, batch_dims=1)
        kept_classes = tf.gather(classes, selected, batch_dims=1)
    valid = tf.range(config.max_detections)[None, :] < num[:, None]
    valid_f = tf.cast(valid, tf.float32)
    return {
        "boxes": kept_boxes * valid_f[..., None],
        "scores": kept_scores * valid_f,
        "classes": tf.where(valid, kept_classes, 0),
        "num_detections": tf.cast(num, tf.int32),
    }
