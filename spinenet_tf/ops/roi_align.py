"""Multilevel ROIAlign (Mask R-CNN, He et al. 2017, Sec. 3) and mask-target cropping.

Static shapes and a single gather per call, so both compile with XLA (TPUs): all levels'
features are flattened into one table, each bilinear sample reads its 4 neighbours from it
by a computed index, as in tensorflow/tpu and Model Garden (`multilevel_crop_and_resize`).
Pixel i of a map sits at coordinate i (no -0.5 shift), bins are sampled once at their
centres (sample_offset 0.5, sampling ratio 1), and sample points are clamped to the map.
"""

from __future__ import annotations

import tensorflow as tf

# FPN's level assignment (Lin et al. 2017, Eq. 1): a 224-px box (ImageNet size) goes to
# level 4.
CANONICAL_SIZE = 224.0
CANONICAL_LEVEL = 4
# The zero border around each ground-truth mask crop: samples outside the box read zeros.
MASK_PAD = 2
_EPSILON = 1e-8


def roi_levels(boxes, min_level: int, max_level: int):
    """The feature level of each box [..., 4]: floor(log2(sqrt(h * w) / 224)) + 4, clamped
    to [min_level, max_level]; int32 [...]. Degenerate boxes get min_level."""
    boxes = tf.cast(boxes, tf.float32)
    area = tf.maximum((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]), 0.0)
    # The reference's exact float ops (floordiv of natural logs), so borderline sizes agree;
    # clamped before the cast, as log(0) = -inf has no int32 value.
    level = (
        tf.math.floordiv(
            tf.math.log(tf.math.divide_no_nan(tf.sqrt(area), CANONICAL_SIZE)), tf.math.log(2.0)
        )
        + CANONICAL_LEVEL
    )
    return tf.cast(tf.clip_by_value(level, float(min_level), float(max_level)), tf.int32)


def _grid(start, length, output_size: int, sample_offset: float):
    """Sample coordinates [B, N, S] along one axis: start + (i + offset) * length / S."""
    steps = tf.range(output_size, dtype=start.dtype) + sample_offset
    return start[..., None] + steps * length[..., None] / output_size


def _bilinear_gather(table, base, row_stride, limit_y, limit_x, y, x):
    """Bilinear samples of 2-D maps stored row-major in `table` [T, C].

    Box n of image b reads the map that starts at row base[b, n] of the table, has rows of
    row_stride[b, n] pixels and last pixel (limit_y, limit_x)[b, n]; y and x [B, N, S] are
    its sample coordinates. Returns [B, N, S, S, C] in the table's dtype.
    """

    def corners(coord, limit):
        limit = limit[..., None]
        c0 = tf.minimum(tf.maximum(tf.floor(coord), 0.0), limit)
        c1 = tf.minimum(c0 + 1.0, limit)
        frac = coord - c0  # outside [0, 1] below 0: linear extrapolation, as the reference
        weights = tf.stack([1.0 - frac, frac], axis=-1)  # [B, N, S, 2]
        return tf.cast(tf.stack([c0, c1], axis=-1), tf.int32), weights

    iy, wy = corners(y, tf.cast(limit_y, y.dtype))
    ix, wx = corners(x, tf.cast(limit_x, x.dtype))
    index = (
        base[:, :, None, None, None, None]
        + iy[:, :, :, :, None, None] * row_stride[:, :, None, None, None, None]
        + ix[:, :, None, None, :, :]
    )  # [B, N, S, 2, S, 2]
    weights = wy[:, :, :, :, None, None] * wx[:, :, None, None, :, :]
    samples = tf.gather(table, index)  # [B, N, S, 2, S, 2, C]
    return tf.einsum("bnyixjc,bnyixj->bnyxc", samples, tf.cast(weights, table.dtype))


def multilevel_roi_align(features: dict, boxes, output_size: int = 7, sample_offset=0.5):
    """ROIAlign of boxes [B, N, 4] (ymin, xmin, ymax, xmax in input pixels) on the level
    `roi_levels` picks from features {"P{level}": [B, H_l, W_l, C]} (consecutive levels).

    Returns [B, N, output_size, output_size, C] in the features' dtype. Each level's samples
    are clamped to that level's own map (H_l - 1, W_l - 1); Model Garden clamps to the first
    level's size divided by the stride, which is the same when the input is a multiple of
    2**max_level.
    """
    levels = sorted(int(key[1:]) for key in features)
    min_level, max_level = levels[0], levels[-1]
    if levels != list(range(min_level, max_level + 1)):
        raise ValueError(f"feature levels {levels} must be consecutive")
    maps = [features[f"P{level}"] for level in levels]
    channels = maps[0].shape[-1]
    batch = tf.shape(maps[0])[0]
    heights = [int(m.shape[1]) for m in maps]
    widths = [int(m.shape[2]) for m in maps]
    starts, total = [], 0
    for h, w in zip(heights, widths, strict=True):
        starts.append(total)
        total += h * w
    flat = [tf.reshape(m, [batch, -1, channels]) for m in maps]
    table = tf.reshape(tf.concat(flat, axis=1), [-1, channels])

    boxes = tf.cast(boxes, tf.float32)
    level = roi_levels(boxes, min_level, max_level)
    scale = tf.pow(2.0, tf.cast(level, tf.float32))
    i = level - min_level

    def per_level(values, dtype):
        return tf.gather(tf.constant(values, dtype), i)

    base = tf.range(batch)[:, None] * total + per_level(starts, tf.int32)
    y = _grid(
        boxes[..., 0] / scale, (boxes[..., 2] - boxes[..., 0]) / scale, output_size, sample_offset
    )
    x = _grid(
        boxes[..., 1] / scale, (boxes[..., 3] - boxes[..., 1]) / scale, output_size, sample_offset
    )
    return _bilinear_gather(
        table,
        base,
        per_level(widths, tf.int32),
        per_level([h - 1 for h in heights], tf.float32),
        per_level([w - 1 for w in widths], tf.float32),
        y,
        x,
    )


def crop_mask_targets(masks, mask_boxes, rois, output_size: int = 28, sample_offset=0.5):
    """Resamples masks [B, N, H, W], each covering its box mask_boxes [B, N, 4], into the
    rois [B, N, 4] at output_size x output_size: the Mask R-CNN mask targets.

    The masks get a MASK_PAD-pixel zero border, so that ROI parts outside the box read
    zero, and are sampled bilinearly like ROIAlign. The result is soft (float32 in [0, 1]
    for [0, 1] masks), not binarised, as in tensorflow/tpu and Model Garden.
    """
    masks = tf.cast(masks, tf.float32)
    mask_boxes = tf.cast(mask_boxes, tf.float32)
    rois = tf.cast(rois, tf.float32)
    batch, num = tf.shape(masks)[0], masks.shape[1]
    height, width = int(masks.shape[2]), int(masks.shape[3])
    padded = tf.pad(masks, [[0, 0], [0, 0], [MASK_PAD, MASK_PAD], [MASK_PAD, MASK_PAD]])
    ph, pw = height + 2 * MASK_PAD, width + 2 * MASK_PAD

    def axis(lo, hi, size):
        # The ROI's start and length in the mask's pixels (the box spans `size` pixels).
        # max(), not the reference's + epsilon: Grappler may fold (hi - lo) + 1e-8 into
        # hi - (lo - 1e-8), which rounds back to 0 for a padding box, and 0 * inf = NaN.
        per_pixel = size / tf.maximum(mask_boxes[..., hi] - mask_boxes[..., lo], _EPSILON)
        start = (rois[..., lo] - mask_boxes[..., lo]) * per_pixel + MASK_PAD
        return _grid(start, (rois[..., hi] - rois[..., lo]) * per_pixel, output_size, sample_offset)

    base = tf.reshape(tf.range(batch * num) * (ph * pw), [batch, num])
    full = tf.ones([batch, num], tf.int32)
    crops = _bilinear_gather(
        tf.reshape(padded, [-1, 1]),
        base,
        full * pw,
        tf.cast(full * (ph - 1), tf.float32),
        tf.cast(full * (pw - 1), tf.float32),
        axis(0, 2, height),
        axis(1, 3, width),
    )
    return crops[..., 0]
