"""The training loop: train, checkpoint, resume, evaluate, diverge."""

import json

import numpy as np
import pytest
import tensorflow as tf

from spinenet_tf.training.config import DataConfig, ExperimentConfig, OptimizerConfig
from spinenet_tf.training.trainer import Trainer, TrainingDiverged
from tests.conftest import tiny_experiment


def test_train_checkpoint_resume_and_evaluate(shapes_records, shapes_dir, tmp_path):
    model_dir = tmp_path / "run"
    config = tiny_experiment(shapes_records, shapes_dir, num_vis_images=2)
    trainer = Trainer(config, model_dir)
    losses = trainer.train()
    assert trainer.step == 4 and np.isfinite(losses["total_loss"])
    assert tf.train.latest_checkpoint(model_dir).endswith("ckpt-4")
    assert losses["lr"] == pytest.approx(0.64 * 4 / 256 * 0.01)  # scaled, then decayed x0.01
    metrics = trainer.evaluate()
    assert set(metrics) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"}
    saved = json.loads((model_dir / "eval_4.json").read_text())
    assert saved["step"] == 4 and saved["AP"] == pytest.approx(metrics["AP"])
    assert len(list((model_dir / "images").glob("step4_image*.png"))) == 2
    assert (model_dir / "images" / "step4_sheet.png").exists()
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
    config = tiny_experiment(
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
    config = tiny_experiment(shapes_records, shapes_dir, num_vis_images=1)
    Trainer(config, model_dir).train()
    evaluator = Trainer(config, model_dir)
    metrics = evaluator.continuous_eval(timeout=30)
    assert evaluator.step == 4 and "AP50" in metrics
    files = tf.io.gfile.listdir(model_dir)
    assert {"eval_4.json", "detections_4.json", "checkpoint"} <= set(files)
    assert tf.io.gfile.listdir(model_dir + "/images")


@pytest.mark.slow  # two 16-step runs of mobile-49XS at 128 px (about 3 minutes)
def test_deterministic_runs_are_bit_identical(tmp_path):
    """deterministic=True: two runs from the same seed, in one process, end with the same
    weights bit for bit. With the steps in a graph while loop they parted within 2-7 steps
    (TF 2.20, CPU); the tiny models of the default suite did not show it."""
    from spinenet_tf.data import create_coco_tfrecord, shapes

    shapes.generate(tmp_path / "shapes", num_train=64, num_val=2, image_size=128, seed=7)
    prefix = str(tmp_path / "records" / "train")
    create_coco_tfrecord.convert(
        shapes.image_dir(tmp_path / "shapes", "train"),
        shapes.annotation_path(tmp_path / "shapes", "train"),
        prefix,
        num_shards=1,
        num_workers=0,
        verbose=False,
    )
    config = ExperimentConfig(
        model_id="mobile-49XS",
        num_classes=5,
        image_size=128,
        model_overrides={"weight_decay": 0.0},
        train=DataConfig(
            source=prefix + "-*.tfrecord", global_batch_size=16, scale_range=(0.75, 1.333)
        ),
        optimizer=OptimizerConfig(name="adam", learning_rate=0.002, warmup_steps=8),
        train_steps=16,
        steps_per_loop=4,
        checkpoint_every=16,
        seed=0,
        deterministic=True,
    )
    weights = []
    for run in ("a", "b"):
        trainer = Trainer(config, tmp_path / run)
        trainer.train()
        weights.append([v.numpy() for v in trainer.model.weights])
    for a, b in zip(*weights, strict=True):
        np.testing.assert_array_equal(a, b)
