"""Mask R-CNN instance segmentation (He et al. 2017) as a task: masks cropped at their boxes
on the host, RPN targets and ROI samples drawn on the accelerator from per-image seeds,
losses normalised over the global batch, COCO box and mask AP, detections with masks served
and drawn."""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from spinenet_tf.data.decoders import detection_decoders
from spinenet_tf.evaluation.coco import CocoEvaluator
from spinenet_tf.models.mask_rcnn import build_maskrcnn
from spinenet_tf.ops.geometry import scaled_image_hw
from spinenet_tf.ops.masks import encode_rle, paste_masks
from spinenet_tf.tasks.base import model_settings, replica_sum
from spinenet_tf.tasks.retinanet import Detector, RetinaNetTask, detections_of, valid_rows

_LOSS_NAMES = ("rpn_score_loss", "rpn_box_loss", "class_loss", "box_loss", "mask_loss")


@dataclasses.dataclass(frozen=True)
class MaskRCNNTask(RetinaNetTask):
    """Mask R-CNN-SpineNet on COCO-style data with instance masks; see
    `spinenet_tf.models.mask_rcnn.MaskRCNN`.

    mask_crop_size: the side of each instance's mask crop the data pipeline hands the model
    (tensorflow/tpu's 112); binarize_masks thresholds those crops at 0.5 (the reference
    keeps them soft); skip_crowd drops crowd instances from training (the reference does).
    """

    mask_crop_size: int = 112
    binarize_masks: bool = False
    skip_crowd: bool = True

    # Beside the losses, how many images of each global batch had no instance to learn
    # from (none annotated, crowds only, or all cropped away by the jitter): their samples
    # are all background and they add no box or mask loss (no NaN: normalisers have +0.01).
    train_loss_names = (*_LOSS_NAMES, "images_without_instances", "total_loss")

    @property
    def decoders(self):
        return detection_decoders(include_masks=True)

    def build_model(self, config):
        return build_maskrcnn(
            config.model_id, config.num_classes, config.image_size, **model_settings(config)
        )

    def parser_options(self, model, training: bool) -> dict:
        return dict(
            # Evaluation scores masks against the annotation file: no crops needed there.
            include_masks=training,
            mask_size=self.mask_crop_size,
            binarize_masks=self.binarize_masks,
            skip_crowd=self.skip_crowd,
            rcnn_labels=training,
        )

    def train_targets(self, model, labels, global_sum):
        # RPN targets and ROI samples depend on the forward pass's proposals (and are cheap
        # on the accelerator): the model draws them from each image's seed.
        return labels

    def train_outputs(self, model, images, targets):
        keys = ("boxes", "classes", "masks", "seed", "valid_hw")
        return model({"images": images, **{k: targets[k] for k in keys}}, training=True)

    def train_losses(self, model, targets, outputs):
        losses = model.losses_from(outputs, replica_sum)
        empty = tf.reduce_sum(tf.cast(tf.reduce_all(targets["classes"] <= 0, axis=1), tf.float32))
        return {
            **{k: losses[k] for k in (*_LOSS_NAMES, "total_loss")},
            "images_without_instances": empty,
        }

    def eval_outputs(self, model, images, groundtruth):
        valid_hw = scaled_image_hw(groundtruth["image_info"])
        return model({"images": images, "valid_hw": valid_hw}, training=False)

    def evaluator(self, config):
        return CocoEvaluator(config.eval.annotation_file, include_masks=True)

    def serving_module(self, model, label_map=None, jit_compile=False):
        return MaskDetector(model, label_map, jit_compile=jit_compile)

    def prediction_records(self, prediction, label_map, score_threshold, image_hw=None):
        records = super().prediction_records(prediction, label_map, score_threshold)
        if image_hw is None or not records:
            return records
        det = detections_of(prediction)
        keep = det["scores"] >= score_threshold
        pasted = paste_masks(det["masks"][keep], det["boxes"][keep], *map(int, image_hw))
        for record, rle in zip(records, encode_rle(pasted), strict=True):
            record["segmentation"] = rle
        return records


class MaskDetector(Detector):
    """A `Detector` for Mask R-CNN: its outputs plus "detection_masks" [B, D, 28, 28]
    float32, each detection's mask probabilities over its box (zero past num_detections).

    Masks stay box-relative, as Model Garden exports them: a full-image mask per detection
    would be D x H x W per image at the original size, which the client often does not need.
    To paste one into the image (what COCO evaluation does): give the 28 x 28 probabilities a
    one-pixel zero border, grow the box by 30 / 28 about its centre, resize the 30 x 30 mask
    bilinearly to the grown box's integer size, threshold at 0.5 and place it at the grown
    box's corner (`spinenet_tf.ops.masks.paste_masks`, NumPy only, does exactly this).
    """

    def _network_and_decode(self, images, valid_hw):
        return self.model({"images": images, "valid_hw": valid_hw}, training=False)

    def outputs(self, det, info) -> dict:
        out = super().outputs(det, info)
        out["detection_masks"] = tf.where(valid_rows(det)[..., None, None], det["masks"], 0.0)
        return out
