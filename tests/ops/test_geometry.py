"""Feature-map sizes and the image_info mapping between original and input pixels."""

import numpy as np
import tensorflow as tf

from spinenet_tf.data import ops
from spinenet_tf.ops.anchors import AnchorConfig
from spinenet_tf.ops.geometry import boxes_to_original, level_size, scaled_image_hw


def test_level_size_is_ceil_of_the_stride_for_ints_tensors_and_unknowns():
    assert level_size((333, 500), 5) == (11, 16)
    assert level_size((None, 64), 3) == (None, 8)
    size = level_size((tf.constant(65), 64), 6)
    assert [int(s) for s in size] == [2, 1]
    assert AnchorConfig().feature_size((333, 500), 5) == (11, 16)


def test_boxes_to_original_inverts_the_pipeline_resize_and_crop():
    """Boxes mapped into a jittered, cropped input and back land where they started, for one
    image and for a batch with an image_info per image."""
    image = tf.zeros([90, 120, 3], tf.uint8)
    boxes = tf.constant([[0.1, 0.2, 0.3, 0.5], [0.4, 0.45, 0.6, 0.55]])
    infos, inputs = [], []
    for seed in ([1, 2], [3, 4]):
        d = ops.resize_and_crop(
            {"image": image, "boxes": boxes, "classes": tf.constant([1, 2])},
            (64, 64),
            scale_range=(1.5, 1.5),
            seed=seed,
        )
        assert np.any(d["image_info"][3].numpy() > 0)  # a real crop offset
        kept = d["classes"].numpy() - 1
        original = boxes_to_original(d["boxes"], d["image_info"])
        np.testing.assert_allclose(original, boxes.numpy()[kept] * [90, 120, 90, 120], atol=2e-3)
        infos.append(d["image_info"])
        inputs.append(tf.pad(d["boxes"], [[0, 2 - len(kept)], [0, 0]]))
    batch = boxes_to_original(tf.stack(inputs), tf.stack(infos))
    for i in range(2):
        np.testing.assert_allclose(batch[i], boxes_to_original(inputs[i], infos[i]), rtol=1e-6)


def test_boxes_to_original_clips_to_the_original_image_when_asked():
    info = tf.constant([[100.0, 50.0], [64.0, 64.0], [0.64, 0.64], [0.0, 0.0]])
    outside = tf.constant([[-6.4, 0.0, 70.0, 40.0]])
    np.testing.assert_allclose(
        boxes_to_original(outside, info, clip=True), [[0.0, 0.0, 100.0, 50.0]], atol=1e-5
    )
    np.testing.assert_allclose(scaled_image_hw(info), [64.0, 32.0])
