"""Decoders: a serialized tf.Example or a TFDS example to a task's common dict.

Detection (Model Garden's COCO schema, TFDS coco/2017): see below. Classification (the
image/encoded + image/class/label schema, TFDS imagenet2012 and the like):
`decode_classification_example`.

The common dict: image uint8 [H, W, 3]; source_id int64; height, width int32; boxes float32
[n, 4] (ymin, xmin, ymax, xmax) normalised to [0, 1]; classes int32 [n] (dataset category
ids, 0 never used); is_crowd bool [n]; areas float32 [n]; with masks, masks uint8 [n, H, W].
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import tensorflow as tf

_BOX_KEYS = tuple(f"image/object/bbox/{k}" for k in ("ymin", "xmin", "ymax", "xmax"))


def _features(include_masks: bool) -> dict:
    features = {
        "image/encoded": tf.io.FixedLenFeature((), tf.string),
        "image/source_id": tf.io.FixedLenFeature((), tf.string, default_value="0"),
        "image/object/class/label": tf.io.VarLenFeature(tf.int64),
        "image/object/is_crowd": tf.io.VarLenFeature(tf.int64),
        "image/object/area": tf.io.VarLenFeature(tf.float32),
        **{k: tf.io.VarLenFeature(tf.float32) for k in _BOX_KEYS},
    }
    if include_masks:
        features["image/object/mask"] = tf.io.VarLenFeature(tf.string)
    return features


def decode_example(serialized, include_masks: bool = False) -> dict:
    """Parses one serialized tf.Example of the COCO schema."""
    parsed = tf.io.parse_single_example(serialized, _features(include_masks))
    dense = {
        k: tf.sparse.to_dense(v) if isinstance(v, tf.SparseTensor) else v for k, v in parsed.items()
    }
    image = tf.io.decode_image(dense["image/encoded"], channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    shape = tf.shape(image)
    boxes = tf.stack([dense[k] for k in _BOX_KEYS], axis=-1)
    classes = tf.cast(dense["image/object/class/label"], tf.int32)
    n = tf.shape(classes)[0]
    is_crowd = dense["image/object/is_crowd"]
    is_crowd = tf.cond(
        tf.size(is_crowd) > 0, lambda: tf.cast(is_crowd, tf.bool), lambda: tf.zeros([n], tf.bool)
    )
    areas = dense["image/object/area"]
    box_areas = (
        (boxes[:, 2] - boxes[:, 0])
        * (boxes[:, 3] - boxes[:, 1])
        * tf.cast(shape[0] * shape[1], tf.float32)
    )
    areas = tf.cond(tf.size(areas) > 0, lambda: areas, lambda: box_areas)
    out = {
        "image": image,
        "source_id": tf.strings.to_number(dense["image/source_id"], tf.int64),
        "height": shape[0],
        "width": shape[1],
        "boxes": boxes,
        "classes": classes,
        "is_crowd": is_crowd,
        "areas": areas,
    }
    if include_masks:
        pngs = dense["image/object/mask"]
        out["masks"] = tf.cond(
            tf.size(pngs) > 0,
            lambda: tf.map_fn(
                lambda png: tf.io.decode_png(png, channels=1)[..., 0],
                pngs,
                fn_output_signature=tf.TensorSpec([None, None], tf.uint8),
            ),
            lambda: tf.zeros([0, shape[0], shape[1]], tf.uint8),
        )
    return out


def decode_tfds(example: dict, include_masks: bool = False) -> dict:
    """Maps a TFDS coco/2017 example to the common dict.

    TFDS numbers the 80 COCO classes 0-79 (contiguous, in COCO's order); they become 1-80 here,
    so class 0 stays background. The ids then differ from COCO's own 1-90: train with
    num_classes=81 and map back through the TFDS label names for COCO-format results.
    """
    image = tf.convert_to_tensor(example["image"])
    shape = tf.shape(image)
    objects = example["objects"]
    boxes = tf.reshape(tf.cast(objects["bbox"], tf.float32), [-1, 4])
    out = {
        "image": image,
        "source_id": tf.cast(example["image/id"], tf.int64),
        "height": shape[0],
        "width": shape[1],
        "boxes": boxes,
        "classes": tf.cast(objects["label"], tf.int32) + 1,
        "is_crowd": tf.cast(objects["is_crowd"], tf.bool),
        "areas": tf.cast(objects["area"], tf.float32),
    }
    if include_masks:
        raise ValueError("TFDS coco/2017 has no instance masks; use TFRecords with masks")
    return out


def decode_classification_example(serialized) -> dict:
    """Parses one serialized tf.Example of the classification schema (Model Garden's and
    tensorflow/tpu's: image/encoded, image/class/label; image/source_id if present).

    Returns {"image": uint8 [H, W, 3], "label": int32 (-1 if absent), "source_id": int64}.
    The image is decoded here, whatever its format, so an undecodable record is caught (and
    named, or skipped) by the reader like a detection record.
    """
    parsed = tf.io.parse_single_example(
        serialized,
        {
            "image/encoded": tf.io.FixedLenFeature((), tf.string),
            "image/class/label": tf.io.FixedLenFeature((), tf.int64, default_value=-1),
            "image/source_id": tf.io.FixedLenFeature((), tf.string, default_value="0"),
        },
    )
    image = tf.io.decode_image(parsed["image/encoded"], channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return {
        "image": image,
        "label": tf.cast(parsed["image/class/label"], tf.int32),
        "source_id": tf.strings.to_number(parsed["image/source_id"], tf.int64),
    }


def decode_tfds_classification(example: dict) -> dict:
    """Maps a TFDS image classification example (imagenet2012, i_naturalist2017, ...) to
    decode_classification_example's dict.

    TFDS numbers classes from 0; they become 1.. here, as tensorflow/tpu's ImageNet records
    number them (class 0 unused: ImageNet has num_classes 1001). The source id is a hash of
    the file name or example id (0 without either).
    """
    image = tf.convert_to_tensor(example["image"])
    if image.shape.rank == 3 and image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(image)
    name = example.get("file_name", example.get("id"))  # imagenet2012; i_naturalist2017
    source_id = (
        tf.strings.to_hash_bucket_fast(name, 2**62)
        if name is not None and name.dtype == tf.string
        else tf.constant(0, tf.int64)
    )
    return {
        "image": image,
        "label": tf.cast(example["label"], tf.int32) + 1,
        "source_id": source_id,
    }


@dataclasses.dataclass(frozen=True)
class Decoders:
    """How `make_dataset` decodes a task's records: `example` takes a serialized tf.Example,
    `tfds` a TFDS example; both return the task's common dict."""

    example: Callable
    tfds: Callable


def detection_decoders(include_masks: bool = False) -> Decoders:
    return Decoders(
        functools.partial(decode_example, include_masks=include_masks),
        functools.partial(decode_tfds, include_masks=include_masks),
    )


CLASSIFICATION_DECODERS = Decoders(decode_classification_example, decode_tfds_classification)
