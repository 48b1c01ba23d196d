"""A trained model for export and predict: an experiment's gin files and a checkpoint."""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from spinenet_tf.data.dataset import data_source, make_dataset
from spinenet_tf.data.label_map import data_classes, read_label_map
from spinenet_tf.training import gin_bindings
from spinenet_tf.training.checkpoints import restore_model
from spinenet_tf.training.config import prepare_synthetic_data


def load_model(
    gin_files,
    gin_params,
    checkpoint: str,
    label_map_path: str | None = None,
    overrides: dict | None = None,
    dtype_policy: str = "float32",
):
    """(task, model, label map) for an experiment's gin files and a training checkpoint
    (prefix or model_dir): what `predict` and `export` serve.

    The label map comes from label_map_path (label map JSON or COCO annotations) or else from
    the experiment's data; `overrides` go to the task's `apply_serving_overrides` (RetinaNet:
    DetectionConfig fields score_threshold, max_detections, ...). Raises ValueError / OSError
    naming a bad gin file, binding or checkpoint.
    """
    gin_bindings.parse(gin_files, gin_params)
    config = gin_bindings.experiment_config()
    num_classes, names = data_classes(config)
    config = dataclasses.replace(config, num_classes=num_classes)
    keras.config.set_dtype_policy(dtype_policy)
    task = config.task
    # Serving runs one replica: plain batch norm (the variables are the same).
    model = task.build_model(dataclasses.replace(config, sync_batch_norm=False))
    restore_model(model, checkpoint)
    task.apply_serving_overrides(model, overrides or {})
    label_map = read_label_map(label_map_path) if label_map_path else names
    return task, model, label_map


def calibration_images(config, task, model, steps: int, seed: int = 0):
    """A callable yielding `steps` images [1, H, W, 3] (float32, normalised) of the
    experiment's own training input pipeline, augmentation included, batch 1: the
    representative dataset int8 quantisation calibrates on (Model Garden's choice too)."""
    config = prepare_synthetic_data(config)
    if not config.train.source:
        raise ValueError(
            "int8 calibration reads the experiment's training data, and it has none: set "
            "DataConfig.source of ExperimentConfig.train (or synthetic_data_dir)"
        )
    parser = task.parser(model, config, training=True)

    def images():
        dataset = make_dataset(
            data_source(config.train.source),
            parser,
            1,
            training=True,
            decoders=task.decoders,
            shuffle_buffer=min(config.train.shuffle_buffer, 256),
            seed=seed,
        )
        for image, _ in dataset.take(steps):
            yield tf.cast(image, tf.float32).numpy()

    return images
