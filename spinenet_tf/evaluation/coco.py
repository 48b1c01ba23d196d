"""COCO box (and mask) evaluation through pycocotools, fed batch by batch with model
detections."""

from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import tensorflow as tf
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from spinenet_tf.ops.geometry import boxes_to_original
from spinenet_tf.ops.masks import encode_rle, paste_masks

METRIC_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)


def _xywh(boxes: np.ndarray) -> np.ndarray:
    """(ymin, xmin, ymax, xmax) -> COCO's (x, y, width, height)."""
    return np.stack(
        [boxes[:, 1], boxes[:, 0], boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]], axis=-1
    )


class CocoEvaluator:
    """Accumulates detections (and, without an annotation file, ground truth) and scores them.

    Class ids are the dataset's category ids (the TFRecord labels), so results are in COCO's
    own ids. Ground truth comes from `annotation_file` when given, otherwise it is rebuilt
    from the evaluation labels of `detection_parser(training=False)`.

    With include_masks, detections carry "masks" [B, D, M, M] (box-relative probabilities,
    as Mask R-CNN predicts them): each is pasted into its original image
    (`ops.masks.paste_masks`), RLE-encoded, and scored too; the mask metrics are
    named mask_AP, mask_AP50, ... beside the box metrics. Mask ground truth needs the
    annotation file (its segmentations).
    """

    def __init__(self, annotation_file: str | None = None, include_masks: bool = False):
        self.annotation_file = annotation_file or None
        if include_masks and not self.annotation_file:
            raise ValueError(
                "mask evaluation needs an annotation file with segmentations "
                "(DataConfig.annotation_file of the evaluation data)"
            )
        self.include_masks = include_masks
        self.reset()

    def reset(self):
        self.detections: list[dict] = []
        self.images: dict[int, dict] = {}
        self.annotations: list[dict] = []

    def update(self, detections: dict, groundtruth: dict):
        """Adds one batch: detections from `RetinaNet.detect` (pixels of the model input) and
        ground truth from the evaluation parser; rows with source_id -1 are batch filler."""
        d = {k: np.asarray(v) for k, v in detections.items()}
        g = {k: np.asarray(v) for k, v in groundtruth.items()}
        for i, source_id in enumerate(g["source_id"].tolist()):
            if source_id < 0:
                continue
            info = g["image_info"][i]
            n = int(d["num_detections"][i])
            boxes = boxes_to_original(d["boxes"][i, :n], info, clip=True).numpy()
            height, width = info[0]
            for box, score, cls in zip(
                _xywh(boxes), d["scores"][i, :n], d["classes"][i, :n], strict=True
            ):
                self.detections.append(
                    {
                        "image_id": int(source_id),
                        "category_id": int(cls),
                        "bbox": [round(float(v), 2) for v in box],
                        "score": round(float(score), 5),
                    }
                )
            if self.include_masks and n:
                # Pasted at the unclipped boxes: the mask covers the box the head saw.
                unclipped = boxes_to_original(d["boxes"][i, :n], info).numpy()
                pasted = paste_masks(d["masks"][i, :n], unclipped, int(height), int(width))
                for det, rle in zip(self.detections[-n:], encode_rle(pasted), strict=True):
                    det["segmentation"] = rle
            self.images[source_id] = {"id": int(source_id), "height": height, "width": width}
            if self.annotation_file is None:
                valid = g["classes"][i] > 0
                for box, cls, crowd, area in zip(
                    _xywh(g["boxes"][i][valid]),
                    g["classes"][i][valid],
                    g["is_crowd"][i][valid],
                    g["areas"][i][valid],
                    strict=True,
                ):
                    self.annotations.append(
                        {
                            "id": len(self.annotations) + 1,
                            "image_id": int(source_id),
                            "category_id": int(cls),
                            "bbox": [float(v) for v in box],
                            "area": float(area),
                            "iscrowd": int(crowd),
                        }
                    )

    def _groundtruth(self) -> COCO:
        with contextlib.redirect_stdout(io.StringIO()):
            if self.annotation_file:  # through tf.io.gfile, so gs:// paths work
                coco = COCO()
                with tf.io.gfile.GFile(self.annotation_file) as f:
                    coco.dataset = json.load(f)
                coco.createIndex()
            else:
                coco = COCO()
                categories = sorted({a["category_id"] for a in self.annotations})
                coco.dataset = {
                    "images": list(self.images.values()),
                    "annotations": self.annotations,
                    "categories": [{"id": c} for c in categories],
                }
                coco.createIndex()
        return coco

    def result(self) -> dict[str, float]:
        """The 12 COCO box metrics (and, with masks, the 12 mask metrics, mask_*) over the
        images seen since the last reset."""
        gt = self._groundtruth()
        unknown = set(self.images) - set(gt.getImgIds())
        if unknown:
            raise ValueError(
                f"{len(unknown)} evaluated image id(s) are not in {self.annotation_file}, "
                f"e.g. {sorted(unknown)[:3]}"
            )
        kinds = [("bbox", "")] + ([("segm", "mask_")] if self.include_masks else [])
        if not self.detections:
            return {p + k: 0.0 for _, p in kinds for k in METRIC_NAMES}
        out = {}
        for iou_type, prefix in kinds:
            with contextlib.redirect_stdout(io.StringIO()):
                # loadRes of segmentations recomputes each bbox from its mask: box AP is
                # scored on detections without them.
                if iou_type == "bbox":
                    dets = [
                        {k: v for k, v in d.items() if k != "segmentation"} for d in self.detections
                    ]
                else:
                    dets = self.detections
                dt = gt.loadRes(dets)
                evaluator = COCOeval(gt, dt, iouType=iou_type)
                evaluator.params.imgIds = sorted(self.images)
                evaluator.evaluate()
                evaluator.accumulate()
                evaluator.summarize()
            out.update(
                {prefix + k: float(v) for k, v in zip(METRIC_NAMES, evaluator.stats, strict=True)}
            )
        return out

    def write_detections(self, path):
        with tf.io.gfile.GFile(path, "w") as f:
            json.dump(self.detections, f)

    def write(self, directory: str, step: int):
        """Writes the detections as COCO results, directory/detections_{step}.json."""
        self.write_detections(os.path.join(directory, f"detections_{step}.json"))
