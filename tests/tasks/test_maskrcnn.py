"""The Mask R-CNN task end to end on the synthetic shapes records (with masks): training on
one and two replicas, COCO box and mask AP, drawings, and an export with detection_masks
served without Keras."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from spinenet_tf.data import shapes
from spinenet_tf.serving.export import export_saved_model
from spinenet_tf.tasks.maskrcnn import MaskRCNNTask
from spinenet_tf.training.config import DataConfig, OptimizerConfig
from spinenet_tf.training.trainer import Trainer
from tests.conftest import MASKRCNN_AT_64, TINY_MASKRCNN, run_tensorflow_only, tiny_experiment

NAMES = {1: "ellipse", 2: "rectangle", 3: "star", 4: "triangle"}
TINY_HEADS = dict(TINY_MASKRCNN, **MASKRCNN_AT_64)


def _config(records, shapes_dir, **overrides):
    """conftest's tiny experiment as Mask R-CNN: deterministic, no shuffling."""
    train = DataConfig(source=records["train"], global_batch_size=4, shuffle_buffer=0)
    return tiny_experiment(
        records,
        shapes_dir,
        **{
            "task": MaskRCNNTask(),
            "model_overrides": TINY_HEADS,
            "train": train,
            "optimizer": OptimizerConfig(learning_rate=0.02, warmup_steps=2),
            "checkpoint_every": 4,
            "num_vis_images": 2,
            "deterministic": True,
            **overrides,
        },
    )


def _odd_records(shapes_dir, directory) -> str:
    """Three training images as records: one whose only instance is a crowd, one with no
    annotation, one with shapes."""
    from spinenet_tf.data import create_coco_tfrecord

    coco = json.loads(shapes.annotation_path(shapes_dir, "train").read_text())
    images = coco["images"][:3]
    ids = [im["id"] for im in images]
    annotations = [a for a in coco["annotations"] if a["image_id"] == ids[2]]
    crowd = next(a for a in coco["annotations"] if a["image_id"] == ids[0])
    annotations.append({**crowd, "iscrowd": 1})
    path = directory / "odd.json"
    path.write_text(json.dumps({**coco, "images": images, "annotations": annotations}))
    prefix = str(directory / "odd")
    create_coco_tfrecord.convert(
        shapes.image_dir(shapes_dir, "train"),
        path,
        prefix,
        num_shards=1,
        include_masks=True,
        num_workers=0,
        verbose=False,
    )
    return prefix + "-*.tfrecord"


@pytest.fixture(scope="module")
def trained(shapes_records, shapes_dir, tmp_path_factory):
    """4 steps on batches of the three odd images (bad input: crowds only, nothing), then
    evaluation on the shapes' held-out split and an export."""
    root = tmp_path_factory.mktemp("maskrcnn_run")
    train = DataConfig(source=_odd_records(shapes_dir, root), global_batch_size=3, shuffle_buffer=0)
    trainer = Trainer(_config(shapes_records, shapes_dir, train=train), root / "run")
    trainer.train()
    metrics = trainer.evaluate()
    export = export_saved_model(
        trainer.model, str(root / "export"), label_map=NAMES, task=trainer.config.task
    )
    return trainer, metrics, export


def test_train_evaluate_draw_and_export_with_masks(trained, shapes_dir, tmp_path):
    trainer, metrics, export = trained
    losses = [h for h in trainer.history]
    assert [h["step"] for h in losses] == [2, 4]
    for name in ("rpn_score_loss", "rpn_box_loss", "class_loss", "box_loss", "mask_loss"):
        assert all(np.isfinite(h[name]) for h in losses), name
    assert losses[-1]["mask_loss"] > 0 and losses[-1]["reg_loss"] > 0
    # Each batch holds the crowd-only and the empty image: counted, and no NaN above.
    assert [h["images_without_instances"] for h in losses] == [2.0, 2.0]
    # Box and mask metrics, both scored through pycocotools against the annotation file.
    assert {"AP", "AP50", "mask_AP", "mask_AP50"} <= set(metrics) and len(metrics) == 24
    assert all(-1.0 <= v <= 1.0 for v in metrics.values())  # -1: no such ground truth
    run = trainer.model_dir
    detections = json.loads(open(os.path.join(run, "detections_4.json")).read())
    assert detections and all("segmentation" in d for d in detections)
    assert os.path.exists(os.path.join(run, "images", "step4_sheet.png"))

    # Served with TensorFlow alone: boxes and box-relative masks per detection.
    jpeg = sorted(tf.io.gfile.glob(str(shapes.image_dir(shapes_dir, "val") / "*.jpg")))[0]
    served = run_tensorflow_only(CONSUMER, tmp_path, export, jpeg)
    assert served["imported"] == []
    n = served["num_detections"]
    masks = np.array(served["detection_masks"])
    assert masks.shape == (100, 28, 28) and np.all(masks[n:] == 0.0)
    assert 0.0 <= masks.min() and masks.max() <= 1.0
    # The same as the Keras model's masks on that image.
    pixels = tf.io.decode_jpeg(tf.io.read_file(jpeg))[None]
    module = trainer.config.task.serving_module(trainer.model)
    ours = module.from_image_tensor(pixels)
    assert int(ours["num_detections"][0]) == n
    np.testing.assert_allclose(ours["detection_masks"][0], masks, atol=1e-5)


def test_predict_records_pasted_masks_and_draws_them(trained):
    trainer = trained[0]
    task = trainer.config.task
    module = task.serving_module(trainer.model, NAMES)
    pixels = np.zeros((50, 70, 3), np.uint8)
    pixels[10:40, 20:60] = 200
    prediction = {k: v.numpy()[0] for k, v in module.from_image_tensor(pixels[None]).items()}
    records = task.prediction_records(prediction, NAMES, 0.0, image_hw=(50, 70))
    assert len(records) == int(prediction["num_detections"])
    assert all(r["segmentation"]["size"] == [50, 70] for r in records)
    drawn = task.draw_prediction(pixels, prediction, NAMES, 0.0)
    assert drawn.size[0] >= 512  # enlarged to be read


@pytest.mark.slow  # two trainers (50 s); the default suite checks the two mechanisms, per-image
# seeds and global-count normalisers, in tests/ops/test_rcnn_targets.py
def test_two_replicas_train_like_one(shapes_records, shapes_dir, mirrored, tmp_path):
    """Per-image sampling seeds and losses normalised by the global batch's counts: the
    same run on 1 and 2 replicas (ROI sampling included)."""
    config = _config(shapes_records, shapes_dir, train_steps=2, steps_per_loop=1)
    runs = []
    for strategy, name in ((tf.distribute.get_strategy(), "one"), (mirrored, "two")):
        trainer = Trainer(config, tmp_path / name, strategy)
        trainer.train()
        runs.append(np.array([[h[k] for k in sorted(h) if "loss" in k] for h in trainer.history]))
    np.testing.assert_allclose(runs[1], runs[0], rtol=2e-4)


CONSUMER = """
import json
import tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
data = open(sys.argv[2], "rb").read()
out = {k: v.numpy()[0].tolist() for k, v in
       model.signatures["image_bytes"](inputs=tf.constant([data])).items()
       if k != "detection_class_names"}
out["imported"] = [m for m in sys.modules if m.split(".")[0] in ("keras", "spinenet_tf")]
json.dump(out, open(sys.argv[3], "w"))
"""
