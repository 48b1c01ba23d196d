"""Image geometry in one place: feature-map sizes, and the image_info that maps boxes between
an original image and the padded network input.

image_info [..., 4, 2] = [original (h, w), input (h, w), scale (y, x), offset (y, x)]:
input pixel = original pixel * scale - offset, per axis. The data pipeline writes it
(`spinenet_tf.data.ops.resize_and_crop`, `fit_image`) and the exported models compute it.
"""

from __future__ import annotations

import tensorflow as tf


def level_size(image_hw, level: int) -> tuple:
    """Spatial size of feature level `level` for an image of size `image_hw`:
    ceil(size / 2**level) per axis; unknown (None) sizes stay None, tensors stay tensors."""
    stride = 2**level
    return tuple(None if s is None else (s + stride - 1) // stride for s in image_hw)


def scaled_image_hw(image_info):
    """The (height, width) [..., 2] of the image inside the padded network input:
    round(original * scale), at most the input size."""
    info = tf.convert_to_tensor(image_info, tf.float32)
    return tf.minimum(tf.round(info[..., 0, :] * info[..., 2, :]), info[..., 1, :])


def _yxyx(pair):
    """[..., 2] (y, x) -> [..., 1, 4] (y, x, y, x), broadcasting over N boxes."""
    return tf.concat([pair, pair], axis=-1)[..., None, :]


def boxes_to_input(boxes, image_info):
    """Boxes [..., N, 4] in original pixels -> input pixels (the inverse of
    `boxes_to_original`)."""
    info = tf.convert_to_tensor(image_info, tf.float32)
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    return boxes * _yxyx(info[..., 2, :]) - _yxyx(info[..., 3, :])


def boxes_to_original(boxes, image_info, clip: bool = False):
    """Boxes [..., N, 4] (ymin, xmin, ymax, xmax) in input pixels -> original pixels, through
    image_info [..., 4, 2] (one per image of the batch, or one for all); `clip` keeps them
    inside the original image."""
    info = tf.convert_to_tensor(image_info, tf.float32)
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    original = (boxes + _yxyx(info[..., 3, :])) / _yxyx(info[..., 2, :])
    if clip:
        original = tf.clip_by_value(original, 0.0, _yxyx(info[..., 0, :]))
    return original
