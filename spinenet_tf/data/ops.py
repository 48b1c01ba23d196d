"""Small dict -> dict ops the parsers compose; each works eagerly and inside tf.data.

Random ops take a stateless `seed` ([2] int), so a pipeline is reproducible when its seeds
are (make_dataset hands each element its own seed).

Geometry conventions: after `resize_and_crop`, boxes are in pixels of the output frame and
`image_info` holds the scale (y, x) from original to output pixels and the crop offset.
"""

from __future__ import annotations

import tensorflow as tf

from spinenet_tf.ops.geometry import boxes_to_original

# ImageNet statistics in 0-255, as Model Garden's SpineNet pipelines normalise.
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
INSTANCE_KEYS = ("boxes", "classes", "is_crowd", "areas", "masks")


def _seed(seed, salt: int):
    seed = tf.zeros([2], tf.int64) if seed is None else tf.cast(seed, tf.int64)
    return seed + tf.constant([0, salt], tf.int64)


def element_seed(seed):
    """An element's seed [2] int64 as a label (zeros when the pipeline gives none)."""
    return _seed(seed, 0)


def _keep_instances(d: dict, keep) -> dict:
    return {k: (tf.boolean_mask(v, keep) if k in INSTANCE_KEYS else v) for k, v in d.items()}


def random_horizontal_flip(d: dict, seed=None, probability: float = 0.5) -> dict:
    """Flips image, normalised boxes and masks with the given probability."""
    flip = tf.random.stateless_uniform([], _seed(seed, 1)) < probability
    out = dict(d)
    out["image"] = tf.cond(flip, lambda: tf.reverse(d["image"], [1]), lambda: d["image"])
    ymin, xmin, ymax, xmax = tf.unstack(d["boxes"], 4, axis=-1)
    flipped = tf.stack([ymin, 1.0 - xmax, ymax, 1.0 - xmin], axis=-1)
    out["boxes"] = tf.cond(flip, lambda: flipped, lambda: d["boxes"])
    if "masks" in d:
        out["masks"] = tf.cond(flip, lambda: tf.reverse(d["masks"], [2]), lambda: d["masks"])
    return out


def crop_masks(d: dict, size: int = 112, binarize: bool = False) -> dict:
    """Instance masks [n, H, W] of 0 / 1 (the original image's) cut out at their boxes and resized
    to size x size, bilinear: the form Mask R-CNN's mask targets take (tensorflow/tpu's
    mask_crop_size 112), so no full-image masks travel on.

    Boxes are normalised, or, once `resize_and_crop` has run (d has image_info), pixels of
    the output frame, clipped to the crop window: they are mapped back to the original
    image first, so each crop covers exactly its final box, as the reference parser does.
    The crops stay soft (float32 in [0, 1], as tensorflow/tpu and Model Garden) unless
    `binarize` thresholds them at 0.5.
    """
    boxes = d["boxes"]
    if "image_info" in d:
        hw = d["image_info"][0]
        boxes = boxes_to_original(boxes, d["image_info"]) / tf.concat([hw, hw], 0)
    crops = crop_and_resize(d["masks"], boxes, size)
    if binarize:
        crops = tf.cast(crops >= 0.5, tf.float32)
    return {**d, "masks": crops}


def crop_and_resize(images, boxes, size: int):
    """tf.image.crop_and_resize (bilinear, extrapolation 0) of one-channel images [n, H, W]
    at one normalised box each [n, 4] -> [n, size, size] float32, computed separably by
    gathers: the same values, without the kernel whose missing cost model makes Grappler
    print a long warning for every input pipeline (tensorflow/tensorflow#56904)."""
    images = tf.cast(images, tf.float32)
    boxes = tf.cast(boxes, tf.float32)
    steps = tf.range(size, dtype=tf.float32) / float(max(size - 1, 1))

    def axis(lo, hi, length):
        # Sample i at lo * (L - 1) + i * (hi - lo) * (L - 1) / (size - 1), as the kernel
        # (a single sample is the box's centre); outside [0, L - 1] it reads zero.
        last = tf.cast(length - 1, tf.float32)
        if size > 1:
            at = lo[:, None] * last + steps[None, :] * ((hi - lo) * last)[:, None]
        else:
            at = (0.5 * (lo + hi) * last)[:, None]
        inside = (at >= 0.0) & (at <= last)
        top = tf.floor(at)
        frac = at - top
        low = tf.cast(tf.clip_by_value(top, 0.0, last), tf.int32)
        high = tf.cast(tf.clip_by_value(tf.math.ceil(at), 0.0, last), tf.int32)
        return low, high, frac, inside

    shape = tf.shape(images)
    y0, y1, fy, in_y = axis(boxes[:, 0], boxes[:, 2], shape[1])
    x0, x1, fx, in_x = axis(boxes[:, 1], boxes[:, 3], shape[2])
    rows = (
        tf.gather(images, y0, axis=1, batch_dims=1) * (1.0 - fy[..., None])
        + tf.gather(images, y1, axis=1, batch_dims=1) * fy[..., None]
    )  # [n, size, W]
    out = (
        tf.gather(rows, x0, axis=2, batch_dims=1) * (1.0 - fx[:, None, :])
        + tf.gather(rows, x1, axis=2, batch_dims=1) * fx[:, None, :]
    )
    return tf.where(in_y[:, :, None] & in_x[:, None, :], out, 0.0)


def drop_crowd(d: dict) -> dict:
    """Drops crowd instances (the reference trains without them; COCO evaluation ignores
    detections on them)."""
    return _keep_instances(d, ~d["is_crowd"])


def resize_and_crop(
    d: dict,
    output_size,
    scale_range=(1.0, 1.0),
    seed=None,
) -> dict:
    """Scale jitter and random crop (Model Garden's resize_and_crop_image, with its meaning of
    jitter: the image is fitted into output_size * s for s drawn from scale_range, then a
    random window of at most output_size is cut out).

    The image stays unpadded (at most output_size) and becomes float32. Boxes become pixels of
    the output frame, clipped to the window; boxes left without area (cropped away, or zero
    height or width) are dropped with their instances, and any box of positive area is kept,
    sub-pixel ones included (as Model Garden).
    `image_info` = [[h, w], [out_h, out_w], [scale_y, scale_x],
    [offset_y, offset_x]].
    """
    out_h, out_w = output_size
    image = d["image"]
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    lo, hi = scale_range
    s = tf.random.stateless_uniform([], _seed(seed, 2), lo, hi) if lo != hi else float(lo)
    target = tf.constant([out_h, out_w], tf.float32) * s
    scale = tf.reduce_min(target / hw)
    scaled = tf.cast(tf.round(hw * scale), tf.int32)
    # The resize scale per axis after rounding, so boxes map exactly onto resized pixels.
    scale_yx = tf.cast(scaled, tf.float32) / hw
    max_offset = tf.maximum(scaled - tf.constant([out_h, out_w]), 0)
    offset = tf.cast(
        tf.random.stateless_uniform([2], _seed(seed, 3)) * tf.cast(max_offset + 1, tf.float32),
        tf.int32,
    )
    offset = tf.minimum(offset, max_offset)
    window = tf.minimum(scaled, [out_h, out_w])
    # Crop, then resize: only the source pixels under the window (plus a pixel of margin for
    # the bilinear taps) are resized, so jitter above 1 costs no more than the output size.
    source_hw = tf.shape(image)[:2]
    offset_f = tf.cast(offset, tf.float32)
    src0 = tf.maximum(tf.cast(tf.floor(offset_f / scale_yx), tf.int32) - 1, 0)
    src1 = tf.cast(tf.math.ceil(tf.cast(offset + window, tf.float32) / scale_yx), tf.int32)
    src1 = tf.minimum(src1 + 1, source_hw)
    region = tf.slice(image, tf.concat([src0, [0]], 0), tf.concat([src1 - src0, [3]], 0))
    region_size = tf.cast(src1 - src0, tf.float32)
    resized = tf.maximum(tf.cast(tf.round(region_size * scale_yx), tf.int32), window)
    scale_yx = tf.cast(resized, tf.float32) / region_size  # exact, after rounding
    src0_f = tf.cast(src0, tf.float32)
    inner = tf.cast(
        tf.round((offset_f / tf.cast(scaled, tf.float32) * hw - src0_f) * scale_yx), tf.int32
    )
    inner = tf.clip_by_value(inner, 0, resized - window)
    image = tf.image.resize(region, resized, method="bilinear", antialias=False)
    image = tf.slice(image, tf.concat([inner, [0]], 0), tf.concat([window, [3]], 0))
    # Output pixel = original pixel * scale - offset, per axis.
    offset_f = src0_f * scale_yx + tf.cast(inner, tf.float32)

    window_f = tf.cast(window, tf.float32)
    boxes = d["boxes"] * tf.tile(hw * scale_yx, [2]) - tf.tile(offset_f, [2])
    boxes = tf.clip_by_value(boxes, 0.0, tf.tile(window_f, [2]))
    out = dict(d, image=image, boxes=boxes)
    out["image_info"] = tf.stack([hw, tf.constant([out_h, out_w], tf.float32), scale_yx, offset_f])
    return _keep_instances(out, (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))


def fit_image(images, output_size):
    """The evaluation and serving resize: images [..., H, W, 3] (a batch shares one size)
    fitted into output_size keeping the aspect ratio (bilinear, float32, unpadded).

    Returns (resized, image_info [4, 2]) with no crop offset; `resize_and_crop` without
    jitter computes the same image and image_info.
    """
    hw = tf.cast(tf.shape(images)[-3:-1], tf.float32)
    out = tf.constant(output_size, tf.float32)
    scaled = tf.cast(tf.round(hw * tf.reduce_min(out / hw)), tf.int32)
    scaled = tf.minimum(scaled, tf.constant(output_size, tf.int32))
    scale_yx = tf.cast(scaled, tf.float32) / hw
    resized = tf.image.resize(images, scaled, method="bilinear", antialias=False)
    return resized, tf.stack([hw, out, scale_yx, tf.zeros([2])])


def fit(d: dict, output_size) -> dict:
    """Evaluation's `resize_and_crop`: the whole image fitted into output_size (`fit_image`),
    boxes (normalised) to pixels of the output frame, clipped to the image, every box kept."""
    image, info = fit_image(d["image"], output_size)
    size = tf.tile(tf.cast(tf.shape(image)[:2], tf.float32), [2])
    boxes = tf.clip_by_value(d["boxes"] * size, 0.0, size)
    return dict(d, image=image, boxes=boxes, image_info=info)


def keep_first_instances(d: dict, n: int) -> dict:
    """At most the first n instances (the ones pad_instances keeps)."""
    return _keep_instances(d, tf.range(tf.shape(d["classes"])[0]) < n)


def normalize_image(d: dict, mean=MEAN_RGB, stddev=STDDEV_RGB) -> dict:
    image = tf.cast(d["image"], tf.float32)
    scale = tf.constant([1.0 / s for s in stddev], tf.float32)  # a multiply beats a divide
    return {**d, "image": (image - tf.constant(mean, tf.float32)) * scale}


def pad_image(d: dict, output_size) -> dict:
    """Zero-pads bottom and right to the static output size (zero is the mean colour once
    normalised)."""
    image = tf.image.pad_to_bounding_box(d["image"], 0, 0, *output_size)
    return {**d, "image": tf.ensure_shape(image, [*output_size, 3])}


def pad_instances(d: dict, max_instances: int = 100, at_least: bool = False) -> dict:
    """Pads or truncates instance fields to max_instances rows: classes -1, boxes 0, crowd
    False. `num_instances` keeps the count before truncation so dropping is visible. With
    at_least, only pads up to max_instances and never truncates (dynamic row count)."""
    out = dict(d)
    n = tf.shape(d["classes"])[0]
    out["num_instances"] = n
    pad_value = {"classes": -1}
    for key in INSTANCE_KEYS:
        if key not in d:
            continue
        v = d[key] if at_least else d[key][:max_instances]
        pad = tf.maximum(max_instances - tf.shape(v)[0], 0)
        paddings = [[0, pad]] + [[0, 0]] * (len(v.shape) - 1)
        v = tf.pad(v, paddings, constant_values=tf.cast(pad_value.get(key, 0), v.dtype))
        out[key] = v if at_least else tf.ensure_shape(v, [max_instances, *v.shape[1:]])
    return out


def groundtruth(d: dict) -> dict:
    """Evaluation ground truth after pad_instances: boxes back in original pixels."""
    return {
        "source_id": d["source_id"],
        "image_info": d["image_info"],
        "boxes": boxes_to_original(d["boxes"], d["image_info"]),
        "classes": d["classes"],
        "is_crowd": d["is_crowd"],
        "areas": d["areas"],
        "num_instances": d["num_instances"],
    }


# -- classification ----------------------------------------------------------------------------
CENTER_CROP_FRACTION = 0.875


def center_crop(image, fraction: float = CENTER_CROP_FRACTION):
    """The centred square of side int(fraction * shorter side) (tensorflow/tpu's eval crop) of
    an image [H, W, C] or a batch [B, H, W, C] of one size."""
    shape = tf.shape(image)
    h, w = shape[-3], shape[-2]
    side = tf.cast(fraction * tf.cast(tf.minimum(h, w), tf.float32), tf.int32)
    side = tf.maximum(side, 1)
    return tf.image.crop_to_bounding_box(image, (h - side) // 2, (w - side) // 2, side, side)


def random_crop(
    image,
    seed=None,
    area_range=(0.08, 1.0),
    aspect_ratio_range=(3 / 4, 4 / 3),
    max_attempts: int = 10,
    fallback_fraction: float = CENTER_CROP_FRACTION,
):
    """Inception-style crop (Szegedy et al. 2015; tensorflow/tpu's random_crop_image_v2): a
    window of area_range of the image and aspect_ratio_range, drawn up to max_attempts times;
    when no draw fits (the whole image comes back), the centre crop instead."""
    shape = tf.shape(image)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=_seed(seed, 2),
        min_object_covered=area_range[0],
        aspect_ratio_range=aspect_ratio_range,
        area_range=area_range,
        max_attempts=max_attempts,
        use_image_if_no_bounding_boxes=True,
    )
    whole = tf.reduce_all(tf.equal(size[:2], shape[:2]))
    return tf.cond(
        whole,
        lambda: center_crop(image, fallback_fraction),
        lambda: tf.slice(image, begin, size),
    )


def resize_bilinear_legacy(image, output_size):
    """Bilinear resize without half-pixel centres: TF1's tf.image.resize_images, which
    tensorflow/tpu's classification input uses (TF2's tf.image.resize samples half-pixel
    centres). [H, W, C] or [B, H, W, C] -> float32 [..., *output_size, C]."""
    batch = image if image.shape.rank == 4 else image[None]
    # The raw op: tf.compat.v1.image.resize_bilinear is the same kernel behind a deprecation
    # warning printed on every trace.
    resized = tf.raw_ops.ResizeBilinear(
        images=batch, size=output_size, align_corners=False, half_pixel_centers=False
    )
    resized = resized if image.shape.rank == 4 else resized[0]
    return tf.ensure_shape(resized, [*image.shape[:-3], *output_size, image.shape[-1]])


def random_flip_image(image, seed=None, probability: float = 0.5):
    flip = tf.random.stateless_uniform([], _seed(seed, 1)) < probability
    return tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
