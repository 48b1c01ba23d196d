"""SavedModel export for TF Serving: one signature per input type, pre- and post-processing
inside, so a client sends images of any size and gets boxes in that image's pixels."""

from __future__ import annotations

import json
import os

import keras
import tensorflow as tf

from spinenet_tf.data import ops
from spinenet_tf.ops.boxes import scaled_image_hw

INPUT_TYPES = ("image_tensor", "image_bytes", "tf_example")
# The one input of every signature is named as Model Garden names it, so clients of a
# Model Garden export need no change.
INPUT_NAME = "inputs"


class Detector:
    """Images in, detections out, for a RetinaNet: the computation an export serves.

    Every method takes a batch of any size and returns {"num_detections" [B] int32,
    "detection_boxes" [B, D, 4] float32 (ymin, xmin, ymax, xmax in pixels of each original
    image), "detection_scores" [B, D], "detection_classes" [B, D] int32 (the dataset's
    category ids, which the model is trained on)} and, with a label map,
    "detection_class_names" [B, D] string ("" past num_detections).

    Preprocessing is the evaluation pipeline's (`spinenet_tf.data.ops`): the image is fitted
    into the model's input size keeping its aspect ratio (bilinear), normalised and padded
    bottom-right, so from the resize on every shape is static but the batch.
    """

    def __init__(self, model, label_map: dict | None = None, jit_compile: bool = False):
        self.model = model
        self.image_size = tuple(model.image_size)
        self.label_map = {int(k): str(v) for k, v in (label_map or {}).items()}
        self.names = None
        if self.label_map:
            ids = sorted(self.label_map)
            self.names = tf.lookup.StaticHashTable(
                tf.lookup.KeyValueTensorInitializer(
                    tf.constant(ids, tf.int32),
                    tf.constant([self.label_map[i] for i in ids], tf.string),
                ),
                default_value="",
            )
        # Network and decoding compile as one XLA cluster when asked (static shapes past the
        # resize); preprocessing stays outside: its shapes depend on the image.
        self._network = tf.function(self._network_and_decode, jit_compile=jit_compile)

    # -- inputs ------------------------------------------------------------------------------
    def from_image_tensor(self, images) -> dict:
        """uint8 images [B, H, W, 3] of one size."""
        images = tf.convert_to_tensor(images)
        if images.dtype != tf.uint8:
            raise TypeError(f"images must be uint8 [B, H, W, 3], got {images.dtype.name}")
        padded, info = self.preprocess(images)
        return self._finish(padded, info)

    def from_image_bytes(self, encoded) -> dict:
        """Encoded images [B] (JPEG, PNG, GIF or BMP), each of its own size."""
        return self._from_encoded(tf.convert_to_tensor(encoded, tf.string))

    def from_tf_example(self, serialized) -> dict:
        """Serialised tf.Examples [B] holding the image in `image/encoded` (the COCO schema
        of spinenet_tf.data.create_coco_tfrecord and Model Garden)."""
        parsed = tf.io.parse_example(
            tf.convert_to_tensor(serialized, tf.string),
            {"image/encoded": tf.io.FixedLenFeature((), tf.string)},
        )
        return self._from_encoded(parsed["image/encoded"])

    def _from_encoded(self, encoded) -> dict:
        h, w = self.image_size

        def one(data):
            # An undecodable string fails this request with InvalidArgument (TF's own
            # message: "Unknown image file format ..."); the server stays up.
            image = tf.io.decode_image(data, channels=3, expand_animations=False)
            image.set_shape([None, None, 3])
            padded, info = self.preprocess(image[None])
            return padded[0], info[0]

        padded, info = tf.map_fn(
            one,
            encoded,
            fn_output_signature=(
                tf.TensorSpec([h, w, 3], tf.float32),
                tf.TensorSpec([4, 2], tf.float32),
            ),
            parallel_iterations=16,
        )
        return self._finish(padded, info)

    # -- stages ------------------------------------------------------------------------------
    def preprocess(self, images):
        """uint8 [B, H, W, 3] of one size -> (network input [B, h, w, 3] float32,
        image_info [B, 4, 2]) as `ops.resize_and_crop` with no jitter and `ops.pad_image`."""
        out_h, out_w = self.image_size
        hw = tf.cast(tf.shape(images)[1:3], tf.float32)
        out = tf.constant([out_h, out_w], tf.float32)
        scaled = tf.cast(tf.round(hw * tf.reduce_min(out / hw)), tf.int32)
        scaled = tf.minimum(scaled, [out_h, out_w])
        scale_yx = tf.cast(scaled, tf.float32) / hw
        resized = tf.image.resize(images, scaled, method="bilinear", antialias=False)
        normalized = ops.normalize_image({"image": resized})["image"]
        padded = tf.image.pad_to_bounding_box(normalized, 0, 0, out_h, out_w)
        padded = tf.ensure_shape(padded, [None, out_h, out_w, 3])
        info = tf.stack([hw, out, scale_yx, tf.zeros([2])])
        return padded, tf.tile(info[None], [tf.shape(images)[0], 1, 1])

    def _network_and_decode(self, images, valid_hw):
        # Keras casts the float32 input to the model's compute dtype (bfloat16 or float16
        # under a mixed policy); decoding casts back to float32.
        return self.model.detect(self.model(images, training=False), valid_hw)

    def _finish(self, padded, info) -> dict:
        det = self._network(padded, scaled_image_hw(info))
        scale = tf.tile(info[:, 2], [1, 2])[:, None, :]
        limit = tf.tile(info[:, 0], [1, 2])[:, None, :]
        out = {
            "num_detections": det["num_detections"],
            # Rows past num_detections are zero from decoding and stay zero here.
            "detection_boxes": tf.clip_by_value(det["boxes"] / scale, 0.0, limit),
            "detection_scores": det["scores"],
            "detection_classes": det["classes"],
        }
        if self.names is not None:
            valid = tf.range(tf.shape(det["scores"])[1])[None, :] < det["num_detections"][:, None]
            names = self.names.lookup(det["classes"])
            out["detection_class_names"] = tf.where(valid, names, "")
        return out


def export_saved_model(
    model,
    export_dir: str,
    input_types=INPUT_TYPES,
    label_map: dict | None = None,
    jit_compile: bool = False,
) -> str:
    """Writes a SavedModel serving `model` with a signature per input type.

    Signatures (each with one input, "inputs"): "image_tensor" (uint8 [B, H, W, 3]),
    "image_bytes" (encoded images [B]), "tf_example" (serialised tf.Examples [B]); the first
    of input_types is also "serving_default". Outputs: see `Detector`. The label map (category
    id -> name) adds "detection_class_names" and is written beside the graph as
    assets.extra/label_map.json. The SavedModel needs only TensorFlow to load and serve.

    Returns export_dir.
    """
    input_types = tuple(input_types)
    unknown = sorted(set(input_types) - set(INPUT_TYPES))
    if unknown or not input_types:
        raise ValueError(f"unknown input types {unknown or input_types}; expected {INPUT_TYPES}")
    detector = Detector(model, label_map, jit_compile=jit_compile)
    specs = {
        "image_tensor": (
            detector.from_image_tensor,
            tf.TensorSpec([None, None, None, 3], tf.uint8, name=INPUT_NAME),
        ),
        "image_bytes": (
            detector.from_image_bytes,
            tf.TensorSpec([None], tf.string, name=INPUT_NAME),
        ),
        "tf_example": (
            detector.from_tf_example,
            tf.TensorSpec([None], tf.string, name=INPUT_NAME),
        ),
    }
    archive = keras.export.ExportArchive()
    archive.track(model)
    if detector.names is not None:
        archive.track(detector.names)
    for name in input_types:
        fn, spec = specs[name]
        archive.add_endpoint(name, fn, input_signature=[spec])
    archive.write_out(export_dir, verbose=False)
    if detector.label_map:
        extra = os.path.join(export_dir, "assets.extra")
        tf.io.gfile.makedirs(extra)
        with tf.io.gfile.GFile(os.path.join(extra, "label_map.json"), "w") as f:
            json.dump({str(k): v for k, v in sorted(detector.label_map.items())}, f, indent=1)
    return export_dir
