"""COCO box evaluation from model detections and parser ground truth, or an annotation file."""

import json

import numpy as np
import pytest

from spinenet_tf.evaluation.coco import CocoEvaluator


def _groundtruth(boxes, classes, source_ids, scale=1.0):
    b, m = np.asarray(classes).shape
    info = np.tile(np.array([[100, 120], [64, 64], [scale, scale], [0, 0]], np.float32), (b, 1, 1))
    return {
        "source_id": np.asarray(source_ids, np.int64),
        "image_info": info,
        "boxes": np.asarray(boxes, np.float32),
        "classes": np.asarray(classes, np.int32),
        "is_crowd": np.zeros((b, m), bool),
        "areas": np.full((b, m), 400.0, np.float32),
    }


def test_coco_evaluator_scores_perfect_detections_and_skips_filler(tmp_path):
    boxes = np.array([[[10, 10, 40, 50], [50, 60, 90, 110]]] * 2, np.float32)
    gt = _groundtruth(boxes, [[1, 3], [2, -1]], [5, -1], scale=0.5)
    detections = {
        "boxes": boxes * 0.5,  # the model sees the image at half size
        "scores": np.array([[0.9, 0.8]] * 2, np.float32),
        "classes": np.array([[1, 3], [2, 2]], np.int32),
        "num_detections": np.array([2, 2], np.int32),
    }
    evaluator = CocoEvaluator()
    evaluator.update(detections, gt)
    metrics = evaluator.result()
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    assert [d["image_id"] for d in evaluator.detections] == [5, 5]
    np.testing.assert_allclose(evaluator.detections[0]["bbox"], [10, 10, 40, 30])
    # The same ground truth from an annotation file gives the same result.
    annotations = {
        "images": [{"id": 5, "height": 100, "width": 120, "file_name": "5.jpg"}],
        "annotations": [
            {"id": i + 1, "image_id": 5, "category_id": c, "bbox": b, "area": 400, "iscrowd": 0}
            for i, (c, b) in enumerate([(1, [10, 10, 40, 30]), (3, [60, 50, 50, 40])])
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 3, "name": "c"}],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(annotations))
    from_file = CocoEvaluator(str(path))
    from_file.update(detections, gt)
    assert from_file.result()["AP"] == pytest.approx(1.0)
    wrong = CocoEvaluator(str(path))
    wrong.update(detections, dict(gt, source_id=np.array([6, -1])))
    with pytest.raises(ValueError, match=r"not in .*gt.json"):
        wrong.result()
