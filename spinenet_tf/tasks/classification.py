"""Image classification with a SpineNet classifier as a task: tensorflow/tpu's ImageNet recipe
(Inception crop, label-smoothed cross-entropy over the global batch), top-1 / top-5 accuracy
over the whole split, probabilities and top classes served and drawn."""

from __future__ import annotations

import collections
import dataclasses
import json
import os

import keras
import numpy as np
import tensorflow as tf

from spinenet_tf.data import ops, shapes_classification
from spinenet_tf.data.decoders import CLASSIFICATION_DECODERS
from spinenet_tf.data.parsers import classification_parser
from spinenet_tf.models.classifier import build_classifier
from spinenet_tf.tasks.base import (
    ImageServing,
    Task,
    class_name_table,
    model_settings,
    real_rows,
    unnormalize,
)
from spinenet_tf.visualize import CLASSIFICATION_LEGEND, draw_classification


@dataclasses.dataclass(frozen=True)
class ClassificationTask(Task):
    """A SpineNet classifier (`spinenet_tf.models.classifier`) on image-level labels.

    Records: the classification schema (image/encoded, image/class/label; written by
    `spinenet_tf.data.create_classification_tfrecord`) or a TFDS classification dataset
    ('tfds:imagenet2012:train'), labels 1..K with num_classes K + 1 as tensorflow/tpu's
    ImageNet (1001). Attributes set the training crop and the evaluation crop.
    """

    area_range: tuple = (0.08, 1.0)
    aspect_ratio_range: tuple = (3 / 4, 4 / 3)
    center_crop_fraction: float = ops.CENTER_CROP_FRACTION

    sheet_legend = CLASSIFICATION_LEGEND

    @property
    def decoders(self):
        return CLASSIFICATION_DECODERS

    def synthetic_data(self, directory, **args):
        return shapes_classification.ensure_dataset(directory, **args)

    def build_model(self, config):
        return build_classifier(
            config.model_id, config.num_classes, config.image_size, **model_settings(config)
        )

    def parser(self, model, config, training: bool):
        parse = classification_parser(
            model.image_size,
            training=training,
            area_range=self.area_range,
            aspect_ratio_range=self.aspect_ratio_range,
            center_crop_fraction=self.center_crop_fraction,
            image_dtype=keras.config.dtype_policy().compute_dtype,
        )
        num_classes = model.num_classes

        def parse_checked(d, seed=None):
            # A label outside the model's classes would be a silent all-zero target.
            check = tf.debugging.Assert(
                (d["label"] >= 0) & (d["label"] < num_classes),
                [
                    "label",
                    d["label"],
                    "of image (source id)",
                    d["source_id"],
                    f"is outside 0..{num_classes - 1} (num_classes {num_classes})",
                ],
            )
            with tf.control_dependencies([check]):
                return parse({**d, "label": tf.identity(d["label"])}, seed)

        return parse_checked

    def train_targets(self, model, labels, global_sum):
        batch = tf.cast(tf.shape(labels["label"])[0], tf.float32)
        return {**labels, "global_batch": global_sum(batch)}

    def train_losses(self, model, targets, outputs):
        # This replica's share of the global batch's mean loss.
        losses = model.loss_from(targets["label"], outputs)
        return {"total_loss": tf.reduce_sum(losses) / targets["global_batch"]}

    def eval_outputs(self, model, images, groundtruth):
        top = model.classify(model(images, training=False))
        return {k: top[k] for k in ("top_k_classes", "top_k_scores")}

    def evaluator(self, config):
        return AccuracyEvaluator()

    def draw(self, images, outputs, groundtruth, label_map=None):
        pixels = unnormalize(images)
        out = []
        for i, source_id in real_rows(groundtruth):
            drawn = draw_classification(
                pixels[i],
                outputs["top_k_classes"][i],
                outputs["top_k_scores"][i],
                label_map,
                label=int(groundtruth["label"][i]),
            )
            out.append((source_id, drawn))
        return out

    def serving_module(self, model, label_map=None, jit_compile=False):
        return ClassifierServing(
            model,
            label_map,
            jit_compile=jit_compile,
            center_crop_fraction=self.center_crop_fraction,
        )

    def draw_prediction(self, pixels, prediction, label_map, score_threshold):
        return draw_classification(
            pixels, prediction["top_k_classes"], prediction["top_k_scores"], label_map
        )

    def prediction_records(self, prediction, label_map, score_threshold, image_hw=None):
        top = zip(prediction["top_k_classes"], prediction["top_k_scores"], strict=True)
        return [
            {
                "category_id": int(cls),
                "category_name": label_map.get(int(cls), str(int(cls))),
                "score": float(score),
            }
            for cls, score in top
            if score >= score_threshold
        ]


class AccuracyEvaluator:
    """Top-1 and top-k accuracy over every real image of the split (batch fillers, source id
    -1, are left out), and per class."""

    def __init__(self):
        self.count = 0
        self.top_1 = 0
        self.top_k = 0
        self.k = None
        self.per_class = collections.defaultdict(lambda: [0, 0])  # label: [images, top-1 right]

    def update(self, outputs, groundtruth):
        real = np.asarray(groundtruth["source_id"]) >= 0
        labels = np.asarray(groundtruth["label"])[real]
        top = np.asarray(outputs["top_k_classes"])[real]
        self.k = top.shape[1]
        right = top[:, 0] == labels
        self.count += int(real.sum())
        self.top_1 += int(right.sum())
        self.top_k += int((top == labels[:, None]).any(axis=1).sum())
        for label, ok in zip(labels.tolist(), right.tolist(), strict=True):
            self.per_class[label][0] += 1
            self.per_class[label][1] += int(ok)

    def result(self):
        if not self.count:
            raise ValueError("no evaluation images: the evaluation split is empty")
        return {
            "top_1_accuracy": self.top_1 / self.count,
            f"top_{self.k}_accuracy": self.top_k / self.count,
            "num_images": float(self.count),
        }

    def write(self, directory, step):
        per_class = {
            str(label): {"images": n, "top_1_accuracy": right / n}
            for label, (n, right) in sorted(self.per_class.items())
        }
        with tf.io.gfile.GFile(os.path.join(directory, f"eval_{step}_per_class.json"), "w") as f:
            json.dump(per_class, f, indent=1)


class ClassifierServing(ImageServing):
    """Images in, classes out, for a `Classifier`: the computation an export serves.

    Preprocessing is the evaluation parser's: the centre crop of center_crop_fraction (the
    task's; 0.875 by default) of the shorter side, normalised and resized (bilinear) to the
    model's input. Every input method returns
    {"logits" [B, K], "probabilities" [B, K], "top_k_classes" [B, k] int32, "top_k_scores"
    [B, k]} and, with a label map, "top_k_class_names" [B, k] string.
    """

    def __init__(
        self,
        model,
        label_map: dict | None = None,
        jit_compile: bool = False,
        center_crop_fraction: float = ops.CENTER_CROP_FRACTION,
    ):
        super().__init__(model.image_size)
        self.model = model
        self.center_crop_fraction = center_crop_fraction
        self.names = class_name_table(label_map)
        self._network = tf.function(self._network_and_classify, jit_compile=jit_compile)

    def resources(self):
        return [self.names] if self.names is not None else []

    def _network_and_classify(self, images):
        logits = self.model(images, training=False)
        return {"logits": tf.cast(logits, tf.float32), **self.model.classify(logits)}

    def preprocess(self, images):
        """uint8 [B, H, W, 3] of one size -> (network input [B, h, w, 3] float32, image_info
        [B, 4, 2]: original size, input size, scale, crop offset in input pixels)."""
        shape = tf.cast(tf.shape(images)[1:3], tf.float32)
        cropped = ops.center_crop(images, self.center_crop_fraction)
        side = tf.cast(tf.shape(cropped)[1:3], tf.float32)
        normalized = ops.normalize_image({"image": cropped})["image"]
        resized = ops.resize_bilinear_legacy(normalized, self.image_size)
        out_hw = tf.constant(self.image_size, tf.float32)
        scale = out_hw / side
        offset = tf.floor((shape - side) / 2.0) * scale
        info = tf.stack([shape, out_hw, scale, offset])
        return resized, tf.tile(info[None], [tf.shape(images)[0], 1, 1])

    def serve(self, padded, image_info):
        out = self._network(padded)
        if self.names is not None:
            out["top_k_class_names"] = self.names.lookup(out["top_k_classes"])
        return out
