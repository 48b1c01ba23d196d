"""Parsers: compositions of the dict ops in spinenet_tf.data.ops into (image, labels) pairs."""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from spinenet_tf.data import ops
from spinenet_tf.ops.geometry import scaled_image_hw


def detection_parser(
    image_size,
    *,
    training: bool,
    scale_range=(1.0, 1.0),
    flip: bool = True,
    max_instances: int = 100,
    targets_fn: Callable | None = None,
    image_dtype="float32",
    include_masks: bool = False,
    mask_size: int = 112,
    binarize_masks: bool = False,
    skip_crowd: bool = False,
    rcnn_labels: bool = False,
) -> Callable:
    """Returns parse(decoded, seed=None) -> (image, labels) for RetinaNet-style detectors.

    Training labels: padded ground truth {"boxes" (output pixels), "classes", "is_crowd",
    "num_instances"} (+ "masks" [M, mask_size, mask_size]: each instance's mask cut out at
    its final box, soft unless binarize_masks; with rcnn_labels, + "seed" [2] int64, the
    element's own stateless seed, for samplers on the accelerator that must not depend on
    which replica draws, and "valid_hw" [2], the image's size inside the padding) and, when
    targets_fn is given,
    what it returns for the unpadded ground truth: `AnchorLabeler.matches` (compact,
    matching on the host, encoding on the accelerator) or `AnchorLabeler.targets` (all of it).
    Evaluation labels: `ops.groundtruth` (source id, image_info, boxes in original pixels,
    classes, crowd flags, areas). Images are normalised, zero-padded to image_size and cast
    to image_dtype (bfloat16 for TPUs halves host-to-device traffic). skip_crowd drops
    crowd instances from training labels (Mask R-CNN's reference does).
    """
    image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if training and scale_range[0] > scale_range[1]:
        raise ValueError(f"scale_range {scale_range} must be (low, high) with low <= high")

    def parse(d: dict, seed=None):
        if not include_masks and "masks" in d:
            d = {k: v for k, v in d.items() if k != "masks"}
        if training and skip_crowd:
            d = ops.drop_crowd(d)
        if training and flip:
            d = ops.random_horizontal_flip(d, seed)
        if training:
            d = ops.resize_and_crop(d, image_size, scale_range, seed)
        else:  # the exported model's preprocessing; every box kept: COCO scores all of them
            d = ops.fit(d, image_size)
        if include_masks:  # at the final boxes, so each crop covers its box exactly
            d = ops.crop_masks(d, mask_size, binarize_masks)
        d = ops.normalize_image(d)
        d = ops.pad_image(d, image_size)
        targets = None
        if training and targets_fn is not None:
            # Matching against the real boxes only (not the padded max_instances rows) is
            # what makes host-side targets cheap: 10x faster at 640 px with a few boxes.
            # Same first rows as the padded labels, so box indices in the targets agree.
            real = ops.keep_first_instances(d, max_instances)
            targets = targets_fn(ops.pad_instances(real, 1, at_least=True))
        d = ops.pad_instances(d, max_instances)
        image = tf.cast(d["image"], image_dtype)
        if not training:
            return image, ops.groundtruth(d)
        keys = ("boxes", "classes", "is_crowd", "num_instances") + (
            ("masks",) if include_masks else ()
        )
        labels = {k: d[k] for k in keys}
        if rcnn_labels:
            labels["seed"] = ops.element_seed(seed)
            labels["valid_hw"] = scaled_image_hw(d["image_info"])
        if targets is not None:
            labels.update(targets)
        return image, labels

    return parse


def classification_parser(
    image_size,
    *,
    training: bool,
    area_range=(0.08, 1.0),
    aspect_ratio_range=(3 / 4, 4 / 3),
    center_crop_fraction: float = ops.CENTER_CROP_FRACTION,
    flip: bool = True,
    image_dtype="float32",
) -> Callable:
    """Returns parse(decoded, seed=None) -> (image, labels) for image classifiers: the input
    of tensorflow/tpu's SpineNet ImageNet recipe.

    Training: Inception-style random crop (`ops.random_crop`: area_range of the image,
    aspect_ratio_range, the centre crop when no draw fits), normalisation, bilinear resize to
    image_size (TF1's, without half-pixel centres), random horizontal flip. Evaluation: the
    centre crop of center_crop_fraction of the shorter side, normalisation, the same resize.
    Labels: {"label": int32} for training; {"label", "source_id"} for evaluation (batch
    fillers get source_id -1).
    """
    image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)

    def parse(d: dict, seed=None):
        image = d["image"]
        if training:
            image = ops.random_crop(
                image, seed, area_range, aspect_ratio_range, fallback_fraction=center_crop_fraction
            )
        else:
            image = ops.center_crop(image, center_crop_fraction)
        image = ops.normalize_image({"image": image})["image"]
        image = ops.resize_bilinear_legacy(image, image_size)
        if training and flip:
            image = ops.random_flip_image(image, seed)
        labels = {"label": tf.cast(d["label"], tf.int32)}
        if not training:
            labels["source_id"] = tf.cast(d["source_id"], tf.int64)
        return tf.cast(image, image_dtype), labels

    return parse
