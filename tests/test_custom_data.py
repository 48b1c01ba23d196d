"""The README's "Your own data", followed step by step: a folder of images and a COCO JSON
with arbitrary category ids (5, 12, 40) -> create_coco_tfrecord -> the custom-data experiment
-> train, evaluate, export, predict, with the class names of the data."""

import json
from pathlib import Path

import gin
import numpy as np
import pytest
import tensorflow as tf

from spinenet_tf.data import create_coco_tfrecord, shapes
from spinenet_tf.data.label_map import resolve_num_classes
from spinenet_tf.serving.export import export_saved_model
from spinenet_tf.serving.load import load_model
from spinenet_tf.training import gin_bindings
from spinenet_tf.training.trainer import Trainer
from tests.conftest import TINY_DETECTOR

ROOT = Path(__file__).resolve().parents[1]
IDS = {1: 5, 2: 12, 3: 40}  # shapes' ellipse, rectangle, triangle; stars left out
NAMES = {5: "ellipse", 12: "rectangle", 40: "triangle"}


@pytest.fixture(scope="module")
def my_data(tmp_path_factory):
    """Images and COCO JSON as a user has them, converted as the README says."""
    root = tmp_path_factory.mktemp("mine")
    shapes.generate(root, num_train=16, num_val=4, image_size=64, seed=5)
    out = {}
    for split in ("train", "val"):
        data = json.loads(shapes.annotation_path(root, split).read_text())
        data["categories"] = [{"id": i, "name": n} for i, n in NAMES.items()]
        data["annotations"] = [
            {**a, "category_id": IDS[a["category_id"]]}
            for a in data["annotations"]
            if a["category_id"] in IDS
        ]
        annotations = root / f"{split}.json"
        annotations.write_text(json.dumps(data))
        create_coco_tfrecord.convert(
            shapes.image_dir(root, split),
            annotations,
            str(root / "records" / split),
            num_shards=1,
            num_workers=0,
            verbose=False,
        )
        out[split] = str(root / "records" / f"{split}-*.tfrecord")
        out[f"{split}_annotations"] = str(annotations)
    out["images"] = shapes.image_dir(root, "val")
    return out


def _config(my_data, *params):
    gin.clear_config()
    files = [ROOT / "gin_configs/experiments/custom_data.gin", ROOT / "gin_configs/runtime/cpu.gin"]
    params = [
        f"TRAIN_RECORDS = '{my_data['train']}'",
        f"VAL_RECORDS = '{my_data['val']}'",
        f"VAL_ANNOTATIONS = '{my_data['val_annotations']}'",
        # Tiny, for the test's sake: the README runs the experiment as it is.
        "ExperimentConfig.image_size = 64",
        f"ExperimentConfig.model_overrides = {TINY_DETECTOR!r}",
        "ExperimentConfig.train_steps = 2",
        "ExperimentConfig.steps_per_loop = 1",
        "ExperimentConfig.checkpoint_every = 2",
        "ExperimentConfig.num_vis_images = 2",
        "train/DataConfig.global_batch_size = 4",
        *params,
    ]
    try:
        gin_bindings.parse(files, params)
        return files, params, gin_bindings.experiment_config()
    finally:
        gin.clear_config()


def test_own_data_trains_evaluates_exports_and_predicts_with_its_names(my_data, tmp_path):
    files, params, config = _config(my_data)
    assert config.num_classes is None and resolve_num_classes(config) == 41
    trainer = Trainer(config, str(tmp_path / "run"))
    assert trainer.model.num_classes == trainer.config.num_classes == 41
    trainer.train(evaluate_every_checkpoint=True)
    assert set(trainer.last_eval) >= {"AP", "AP50"}
    sheet = tmp_path / "run" / "images" / "step2_sheet.png"
    assert sheet.exists()

    # Two steps leave every score near the prior (0.01): decode below it to see classes.
    run_dir = str(tmp_path / "run")
    task, model, label_map = load_model(files, params, run_dir, overrides={"score_threshold": 1e-3})
    assert label_map == NAMES
    export_saved_model(model, str(tmp_path / "export"), label_map=label_map, task=task)
    # What predict and TF Serving call: the image_bytes signature, names included. (The
    # predict command's own test is tests/serving/test_cli.py; importing its module here
    # would define its flags twice in this process.)
    serve = tf.saved_model.load(str(tmp_path / "export")).signatures["image_bytes"]
    encoded = [p.read_bytes() for p in sorted(Path(my_data["images"]).glob("*.jpg"))]
    out = serve(inputs=tf.constant(encoded))
    valid = np.arange(out["detection_scores"].shape[1]) < out["num_detections"].numpy()[:, None]
    assert valid.sum() > 0
    classes = set(out["detection_classes"].numpy()[valid].tolist())
    names = {n.decode() for n in out["detection_class_names"].numpy()[valid].tolist()}
    assert classes <= set(NAMES) and names <= set(NAMES.values())
    assert all(NAMES[c] in names for c in classes)


def test_too_few_classes_stop_before_training_naming_the_largest_id(my_data, tmp_path):
    _, _, config = _config(my_data, "ExperimentConfig.num_classes = 20")
    with pytest.raises(ValueError, match=r"category id 40 \('triangle'\) in .*val.json needs"):
        Trainer(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    assert np.isscalar(resolve_num_classes(_config(my_data)[2]))
