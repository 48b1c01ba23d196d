"""The classification task end to end on the synthetic shapes classification data: input
pipeline, training, whole-split top-1 / top-5, drawings, export served without Keras, and a
detector started from the classifier's backbone."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from spinenet_tf.data import ops
from spinenet_tf.data.dataset import make_dataset
from spinenet_tf.data.decoders import CLASSIFICATION_DECODERS
from spinenet_tf.data.parsers import classification_parser
from spinenet_tf.serving.export import export_saved_model
from spinenet_tf.tasks.classification import ClassificationTask
from spinenet_tf.training.checkpoints import init_from_checkpoint
from spinenet_tf.training.config import DataConfig, ExperimentConfig, OptimizerConfig
from spinenet_tf.training.optimizers import Adam
from spinenet_tf.training.trainer import Trainer
from tests.conftest import FIVE_BLOCKS, TINY, TINY_DETECTOR, run_tensorflow_only

NAMES = {1: "ellipse", 2: "rectangle", 3: "star", 4: "triangle"}
NUM_VAL = 10


@pytest.fixture
def data(classification_data):
    return classification_data


def _config(data, **overrides):
    base = dict(
        task=ClassificationTask(),
        model_id="49S",
        num_classes=5,
        image_size=48,
        model_overrides=dict(TINY, **FIVE_BLOCKS),
        train=DataConfig(source=data["train"], global_batch_size=4),
        # 10 images in batches of 4: the last batch holds 2 fillers, which must not count.
        eval=DataConfig(source=data["val"], global_batch_size=4, annotation_file=data["label_map"]),
        # The classification quickstart's optimizer (the detector tests train with SGD).
        optimizer=OptimizerConfig(
            name="adam", learning_rate=0.001, reference_batch_size=4, warmup_steps=2
        ),
        train_steps=4,
        steps_per_loop=2,
        checkpoint_every=4,
        num_vis_images=3,
        seed=1,
    )
    base.update(overrides)
    return ExperimentConfig(**base)


def test_pipeline_crops_resizes_and_marks_fillers(data):
    parse = classification_parser(40, training=True)
    ds = make_dataset(
        data["train"], parse, 4, training=True, decoders=CLASSIFICATION_DECODERS, seed=0
    )
    images, labels = next(iter(ds))
    assert images.shape == (4, 40, 40, 3) and images.dtype == tf.float32
    assert set(labels) == {"label"} and set(labels["label"].numpy()) <= set(NAMES)
    eval_ds = make_dataset(
        data["val"],
        classification_parser(40, training=False),
        4,
        training=False,
        decoders=CLASSIFICATION_DECODERS,
    )
    ids = np.concatenate([g["source_id"].numpy() for _, g in eval_ds])
    assert len(ids) == 12 and (ids >= 0).sum() == NUM_VAL and (ids[NUM_VAL:] == -1).all()


def test_random_crop_falls_back_to_the_centre_crop():
    image = tf.constant(np.random.default_rng(0).integers(0, 255, (30, 40, 3)), tf.uint8)
    centre = ops.center_crop(image)  # int(0.875 * 30) = 26, offsets (2, 7)
    np.testing.assert_array_equal(centre, image[2:28, 7:33])
    # No window of all of the image's area with aspect 1/2 fits: the centre crop is taken.
    fallback = ops.random_crop(image, tf.constant([1, 2]), (1.0, 1.0), (0.5, 0.5))
    np.testing.assert_array_equal(fallback, centre)
    crops = {ops.random_crop(image, tf.constant([s, 0])).shape for s in range(8)}
    assert len(crops) > 1  # seeded, and the seed matters


def test_serving_crops_as_the_task_evaluates(data):
    """The export's preprocessing takes the task's centre crop fraction, as its evaluation
    parser does (the classification quickstart evaluates on the whole centred square)."""
    image = tf.constant(np.random.default_rng(1).integers(0, 255, (1, 30, 40, 3)), tf.uint8)
    model = ClassificationTask().build_model(_config(data))  # the crop is not the model's
    for fraction, (top, left, side) in [(1.0, (0, 5, 30)), (0.875, (2, 7, 26))]:
        task = ClassificationTask(center_crop_fraction=fraction)
        config = _config(data, task=task)
        served, _ = task.serving_module(model).preprocess(image)
        parse = task.parser(model, config, training=False)
        parsed, _ = parse({"image": image[0], "label": 1, "source_id": 3})
        np.testing.assert_allclose(served[0], parsed, atol=1e-5)
        crop = ops.normalize_image({"image": image[0, top : top + side, left : left + side]})
        expected = ops.resize_bilinear_legacy(crop["image"], (48, 48))
        np.testing.assert_allclose(served[0], expected, atol=1e-5)


def test_legacy_bilinear_resize_has_no_half_pixel_centres():
    row = tf.reshape(tf.range(4.0), (1, 4, 1))
    up = ops.resize_bilinear_legacy(row, (1, 8))
    # TF1: source x = dst * in / out, so 0, 0.5, 1, ... (TF2 would start at -0.25 -> 0).
    np.testing.assert_allclose(up.numpy().ravel(), [0, 0.5, 1, 1.5, 2, 2.5, 3, 3])


def test_a_label_outside_num_classes_is_named(data):
    task = ClassificationTask()
    config = _config(data, num_classes=3)  # labels go up to 4
    model = task.build_model(config)
    parse = task.parser(model, config, training=False)
    decoded = {"image": tf.zeros([8, 8, 3], tf.uint8), "label": 4, "source_id": 17}
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"outside 0..2"):
        parse(decoded)


@pytest.fixture(scope="module")
def trained(classification_data, tmp_path_factory):
    """A 4-step run of the tiny classifier, evaluated, and its export."""
    root = tmp_path_factory.mktemp("cls_run")
    config = _config(classification_data)
    trainer = Trainer(config, root / "run")
    losses = trainer.train()
    metrics = trainer.evaluate()
    export = export_saved_model(
        trainer.model, str(root / "export"), label_map=NAMES, task=config.task
    )
    return trainer, losses, metrics, export


def test_train_evaluate_draw_export_and_detector_from_backbone(data, trained, tmp_path, caplog):
    trainer, losses, metrics, export = trained
    config = trainer.config
    run = trainer.model_dir
    assert np.isfinite(losses["total_loss"]) and losses["reg_loss"] > 0
    assert isinstance(trainer.optimizer, Adam) and trainer.optimizer.iterations == 4
    assert metrics["num_images"] == NUM_VAL  # the whole split, fillers masked
    assert set(metrics) == {"top_1_accuracy", "top_5_accuracy", "num_images"}
    assert 0.0 <= metrics["top_1_accuracy"] <= metrics["top_5_accuracy"] == 1.0  # 5 classes
    written = json.loads((Path(run) / "eval_4.json").read_text())
    assert written["top_1_accuracy"] == pytest.approx(metrics["top_1_accuracy"])
    per_class = json.loads((Path(run) / "eval_4_per_class.json").read_text())
    assert sum(v["images"] for v in per_class.values()) == NUM_VAL
    sheet = Path(run) / "images" / "step4_sheet.png"
    assert sheet.exists()
    assert trainer.label_map == NAMES

    # Served with TensorFlow alone: probabilities and top-5 ids and names.
    jpeg = sorted(tf.io.gfile.glob(data["images"]))[0]
    served = run_tensorflow_only(CONSUMER, tmp_path, export, jpeg)
    assert served["imported"] == []
    assert len(served["top_k_classes"]) == 5 and len(served["probabilities"]) == 5
    assert served["top_k_class_names"][0] == NAMES.get(served["top_k_classes"][0], "")
    pixels = tf.io.decode_jpeg(tf.io.read_file(jpeg)).numpy()
    module = config.task.serving_module(trainer.model)
    expected = module.from_image_tensor(pixels[None])
    np.testing.assert_allclose(served["probabilities"], expected["probabilities"][0], atol=1e-5)
    np.testing.assert_allclose(served["tensor_probabilities"], served["probabilities"], atol=1e-6)

    # A detector starts from the classifier's backbone: ExperimentConfig.init_checkpoint.
    from spinenet_tf.tasks.retinanet import RetinaNetTask

    detector_config = _config(
        data,
        task=RetinaNetTask(),
        model_overrides=TINY_DETECTOR,
        init_checkpoint=run,
        init_scope="backbone",
    )
    detector = Trainer(detector_config, tmp_path / "detector")
    with caplog.at_level(logging.INFO, logger="spinenet_tf"):
        assert detector.restore() == 0
    pairs = zip(detector.model.backbone.weights, trainer.model.backbone.weights, strict=True)
    for ours, theirs in pairs:
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    summary = caplog.text
    n = len(detector.model.backbone.weights)
    assert f"loaded {n} variables, left " in summary
    assert "fresh: head/" in summary and "init scope 'backbone'" in summary
    report = init_from_checkpoint(detector.model, run, scope="backbone")
    assert len(report.loaded) == n and all(p.startswith("head/") for p in report.fresh)

    # A checkpoint of another backbone (another width: another model id) is refused.
    other = RetinaNetTask().build_model(
        _config(data, model_overrides=dict(TINY, **FIVE_BLOCKS, filter_size_scale=0.5))
    )
    with pytest.raises(ValueError, match="does not hold this model's backbone"):
        init_from_checkpoint(other, run)


@pytest.mark.slow  # a subprocess loading TensorFlow
def test_predict_command_draws_and_records_top_classes(data, trained, tmp_path):
    export = trained[3]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "spinenet_tf.predict",
            f"--saved_model={export}",
            f"--images={data['images']}",
            f"--output_dir={tmp_path / 'out'}",
            "--score_threshold=0",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{NUM_VAL} images, {NUM_VAL * 5} results" in result.stdout
    records = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert {r["category_name"] for r in records} == set(NAMES.values()) | {"0"}
    drawn = sorted((tmp_path / "out").glob("*.png"))
    assert len(drawn) == NUM_VAL
    from PIL import Image

    with Image.open(drawn[0]) as image:  # enlarged to 512 px, the classes listed beneath
        assert image.width >= 512 or image.height > 512 + 5 * 12


CONSUMER = """
import json
import tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
data = open(sys.argv[2], "rb").read()
out = {k: v.numpy()[0].tolist() for k, v in
       model.signatures["image_bytes"](inputs=tf.constant([data])).items()}
out["top_k_class_names"] = [n.decode() for n in out["top_k_class_names"]]
pixels = tf.io.decode_jpeg(data)[None]
out["tensor_probabilities"] = (
    model.signatures["image_tensor"](inputs=pixels)["probabilities"].numpy()[0].tolist())
out["imported"] = [m for m in sys.modules if m.split(".")[0] in ("keras", "spinenet_tf")]
json.dump(out, open(sys.argv[3], "w"))
"""


def test_drawn_top_classes_leave_out_ids_the_label_map_does_not_name():
    from spinenet_tf.visualize import draw_classification

    image = np.zeros((32, 32, 3), np.uint8)
    classes, scores = np.array([2, 0, 1]), np.array([0.7, 0.2, 0.1])
    named = draw_classification(image, classes, scores, {1: "ellipse", 2: "rectangle"})
    unnamed = draw_classification(image, classes, scores)
    one_line = draw_classification(image, classes[:1], scores[:1])
    line = unnamed.height - one_line.height
    assert line > 0 and named.height == unnamed.height - line // 2  # 2 lines, not 3
