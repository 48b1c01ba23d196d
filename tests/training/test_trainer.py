"""Schedules, COCO evaluation, and the training loop: train, resume, evaluate, diverge."""

import json

import numpy as np
import pytest
import tensorflow as tf

from spinenet_tf.evaluation.coco import CocoEvaluator
from spinenet_tf.training import schedules
from spinenet_tf.training.trainer import (
    DataConfig,
    ExperimentConfig,
    OptimizerConfig,
    Trainer,
    TrainingDiverged,
)
from tests.conftest import TINY


def test_warmup_step_and_cosine_schedules():
    step = schedules.WarmupSchedule(1.0, 100, 10, 0.1, "step", (0.5, 0.9), (0.1, 0.01))
    values = [float(step(s)) for s in (0, 5, 10, 49, 50, 89, 90, 99)]
    np.testing.assert_allclose(values, [0.1, 0.55, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01], rtol=1e-6)
    cosine = schedules.WarmupSchedule(1.0, 110, 10, 0.0, "cosine")
    np.testing.assert_allclose(
        [float(cosine(s)) for s in (5, 10, 60, 110)], [0.5, 1.0, 0.5, 0.0], atol=1e-6
    )
    assert schedules.WarmupSchedule.from_config(step.get_config()).get_config() == step.get_config()
    with pytest.raises(ValueError, match="unknown decay 'linear'"):
        schedules.WarmupSchedule(1.0, 10, decay="linear")


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


def _config(records, shapes_dir, **overrides):
    from spinenet_tf.data import shapes

    base = dict(
        model_id="49S",
        num_classes=5,
        image_size=64,
        model_overrides=dict(TINY, head_num_filters=16, head_num_convs=1, min_level=3, max_level=5),
        train=DataConfig(source=records["train"], global_batch_size=4, scale_range=(0.8, 1.2)),
        eval=DataConfig(
            source=records["val"],
            global_batch_size=4,
            annotation_file=str(shapes.annotation_path(shapes_dir, "val")),
        ),
        optimizer=OptimizerConfig(learning_rate=0.64, warmup_steps=2),
        train_steps=4,
        steps_per_loop=2,
        checkpoint_every=2,
        seed=1,
    )
    base.update(overrides)
    return ExperimentConfig(**base)


def test_train_checkpoint_resume_and_evaluate(shapes_records, shapes_dir, tmp_path):
    model_dir = tmp_path / "run"
    config = _config(shapes_records, shapes_dir, num_vis_images=2)
    trainer = Trainer(config, model_dir)
    losses = trainer.train()
    assert trainer.step == 4 and np.isfinite(losses["total_loss"])
    assert tf.train.latest_checkpoint(model_dir).endswith("ckpt-4")
    assert losses["lr"] == pytest.approx(0.64 * 4 / 256 * 0.01)  # scaled, then decayed x0.01
    metrics = trainer.evaluate()
    assert set(metrics) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"}
    saved = json.loads((model_dir / "eval_4.json").read_text())
    assert saved["step"] == 4 and saved["AP"] == pytest.approx(metrics["AP"])
    assert len(list((model_dir / "images").glob("*.png"))) == 2
    assert list((model_dir / "eval").iterdir())  # TensorBoard events

    # A new trainer (a restarted process) resumes at step 4 with the same weights.
    longer = Trainer(dataclasses_replace(config, train_steps=6), model_dir)
    assert longer.restore() == 4
    for a, b in zip(longer.model.weights, trainer.model.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    longer.train()
    assert longer.step == 6
    assert tf.train.latest_checkpoint(model_dir).endswith("ckpt-6")


def dataclasses_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_diverging_loss_stops_with_the_step_and_saves_nothing(shapes_records, shapes_dir, tmp_path):
    config = _config(
        shapes_records,
        shapes_dir,
        optimizer=OptimizerConfig(learning_rate=1e12, warmup_steps=0, momentum=0.0),
        train_steps=6,
        steps_per_loop=1,
        checkpoint_every=100,
    )
    trainer = Trainer(config, tmp_path / "nan")
    with pytest.raises(TrainingDiverged, match=r"not finite at step \d"):
        trainer.train()
    assert tf.train.latest_checkpoint(tmp_path / "nan") is None


@pytest.mark.slow  # a training and an evaluating trainer; train_and_eval is tested above
def test_continuous_eval_on_a_non_local_filesystem(shapes_records, shapes_dir):
    """model_dir on TF's in-memory filesystem (ram://), as on gs://: checkpoints, summaries,
    results and images all go through tf.io.gfile; continuous_eval evaluates the checkpoints
    until the one at train_steps."""
    model_dir = "ram://spinenet_continuous_eval"
    config = _config(shapes_records, shapes_dir, num_vis_images=1)
    Trainer(config, model_dir).train()
    evaluator = Trainer(config, model_dir)
    metrics = evaluator.continuous_eval(timeout=30)
    assert evaluator.step == 4 and "AP50" in metrics
    files = tf.io.gfile.listdir(model_dir)
    assert {"eval_4.json", "detections_4.json", "checkpoint"} <= set(files)
    assert tf.io.gfile.listdir(model_dir + "/images")
