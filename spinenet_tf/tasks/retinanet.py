"""RetinaNet detection (Lin et al. 2017) as a task: anchors matched on the host, focal and
box losses normalised over the global batch, COCO box AP, detections served and drawn."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from spinenet_tf.data import shapes
from spinenet_tf.data.parsers import detection_parser
from spinenet_tf.evaluation.coco import CocoEvaluator
from spinenet_tf.models.retinanet import build_retinanet
from spinenet_tf.ops.geometry import boxes_to_input, boxes_to_original, scaled_image_hw
from spinenet_tf.tasks.base import (
    ImageServing,
    Task,
    class_name_table,
    model_settings,
    real_rows,
    unnormalize,
)
from spinenet_tf.visualize import DETECTION_LEGEND, draw_detections


@dataclasses.dataclass(frozen=True)
class RetinaNetTask(Task):
    """RetinaNet-SpineNet on COCO-style data; see `spinenet_tf.models.retinanet.RetinaNet`."""

    train_loss_names = ("cls_loss", "box_loss", "total_loss")
    sheet_legend = DETECTION_LEGEND

    def synthetic_data(self, directory, **args):
        paths = shapes.ensure_dataset(directory, **args)
        return {
            "train": paths["train"],
            "val": paths["val"],
            "label_map": paths["val_annotations"],
            "images": str(shapes.image_dir(directory, "val") / "*.jpg"),
        }

    def build_model(self, config):
        return build_retinanet(
            config.model_id, config.num_classes, config.image_size, **model_settings(config)
        )

    def parser(self, model, config, training: bool):
        data = config.train if training else config.eval
        return detection_parser(
            config.image_size,
            training=training,
            scale_range=data.scale_range,
            max_instances=data.max_instances,
            image_dtype=keras.config.dtype_policy().compute_dtype,
            **self.parser_options(model, training),
        )

    def parser_options(self, model, training: bool) -> dict:
        """`detection_parser` arguments of this head: RetinaNet matches anchors on the host."""
        return {"targets_fn": model.labeler.matches if training else None}

    def train_targets(self, model, labels, global_sum):
        targets = model.labeler.targets(labels)
        # The loss is normalised by the positives of the whole global batch, so the
        # replicas' losses sum to the single-device loss of that batch.
        positives = tf.reduce_sum(targets["box_weights"])
        return {**targets, "normalizer": global_sum(positives) + 1.0}

    def train_losses(self, model, targets, outputs):
        losses = model.losses_from(targets, outputs, targets["normalizer"])
        return {
            "total_loss": losses["total_loss"],
            "cls_loss": losses["cls_loss"],
            "box_loss": losses["box_loss"],
        }

    def eval_outputs(self, model, images, groundtruth):
        valid_hw = scaled_image_hw(groundtruth["image_info"])
        return model.detect(model(images, training=False), valid_hw)

    def evaluator(self, config):
        return CocoEvaluator(config.eval.annotation_file)

    def draw(self, images, outputs, groundtruth, label_map=None):
        pixels = unnormalize(images)
        out = []
        for i, source_id in real_rows(groundtruth):
            info = groundtruth["image_info"][i]
            h, w = scaled_image_hw(info).numpy().astype(int)
            one = {k: np.asarray(v[i]) for k, v in outputs.items()}
            truth = {
                "boxes": boxes_to_input(groundtruth["boxes"][i], info).numpy(),
                "classes": np.asarray(groundtruth["classes"][i]),
            }
            drawn = draw_detections(pixels[i, :h, :w], one, label_map, groundtruth=truth)
            out.append((source_id, drawn))
        return out

    def serving_module(self, model, label_map=None, jit_compile=False):
        return Detector(model, label_map, jit_compile=jit_compile)

    def apply_serving_overrides(self, model, overrides):
        if overrides:
            model.detection_config = dataclasses.replace(model.detection_config, **overrides)

    def draw_prediction(self, pixels, prediction, label_map, score_threshold):
        return draw_detections(pixels, detections_of(prediction), label_map, score_threshold)

    def prediction_records(self, prediction, label_map, score_threshold, image_hw=None):
        det = detections_of(prediction)
        records = []
        for box, score, cls in zip(det["boxes"], det["scores"], det["classes"], strict=True):
            if score < score_threshold:
                continue
            ymin, xmin, ymax, xmax = (float(v) for v in box)
            records.append(
                {
                    "category_id": int(cls),
                    "category_name": label_map.get(int(cls), str(int(cls))),
                    "bbox": [xmin, ymin, xmax - xmin, ymax - ymin],
                    "score": float(score),
                }
            )
        return records


def valid_rows(det: dict):
    """[B, D] bool: the rows of decoded detections before each image's num_detections."""
    return tf.range(tf.shape(det["scores"])[1])[None, :] < det["num_detections"][:, None]


def detections_of(prediction: dict) -> dict:
    """One image's served outputs -> the detections `draw_detections` takes (with masks when
    the export has detection_masks)."""
    n = int(prediction["num_detections"])
    out = {
        "boxes": np.asarray(prediction["detection_boxes"][:n]),
        "scores": np.asarray(prediction["detection_scores"][:n]),
        "classes": np.asarray(prediction["detection_classes"][:n]),
    }
    if "detection_masks" in prediction:
        out["masks"] = np.asarray(prediction["detection_masks"][:n])
    return out


class Detector(ImageServing):
    """Images in, detections out, for a RetinaNet: the computation an export serves.

    Every input method (`ImageServing`) takes a batch of any size and returns
    {"num_detections" [B] int32, "detection_boxes" [B, D, 4] float32 (ymin, xmin, ymax, xmax
    in pixels of each original image), "detection_scores" [B, D], "detection_classes" [B, D]
    int32 (the dataset's category ids, which the model is trained on)} and, with a label map,
    "detection_class_names" [B, D] string ("" past num_detections).
    """

    def __init__(self, model, label_map: dict | None = None, jit_compile: bool = False):
        super().__init__(model.image_size)
        self.model = model
        self.names = class_name_table(label_map)
        # Network and decoding compile as one XLA cluster when asked (static shapes past the
        # resize); preprocessing stays outside: its shapes depend on the image.
        self._network = tf.function(self._network_and_decode, jit_compile=jit_compile)

    def resources(self) -> list:
        return [self.names] if self.names is not None else []

    def _network_and_decode(self, images, valid_hw):
        # Keras casts the float32 input to the model's compute dtype (bfloat16 or float16
        # under a mixed policy); decoding casts back to float32.
        return self.model.detect(self.model(images, training=False), valid_hw)

    def serve(self, padded, info) -> dict:
        return self.outputs(self._network(padded, scaled_image_hw(info)), info)

    def outputs(self, det: dict, info) -> dict:
        """The served outputs of decoded detections `det` (input pixels) and image_info."""
        out = {
            "num_detections": det["num_detections"],
            # Rows past num_detections are zero from decoding and stay zero here (the
            # serving preprocessing has no crop offset).
            "detection_boxes": boxes_to_original(det["boxes"], info, clip=True),
            "detection_scores": det["scores"],
            "detection_classes": det["classes"],
        }
        if self.names is not None:
            names = self.names.lookup(det["classes"])
            out["detection_class_names"] = tf.where(valid_rows(det), names, "")
        return out
