"""The one place gin meets the code: every configurable the .gin files may bind.

Modeling code carries no gin decorators (they break Keras 3's config capture); experiments
bind these constructors by name from gin_configs/.
"""

from __future__ import annotations

import os
from pathlib import Path

import gin

from spinenet_tf.training import trainer

ExperimentConfig = gin.external_configurable(trainer.ExperimentConfig, module="spinenet_tf")
DataConfig = gin.external_configurable(trainer.DataConfig, module="spinenet_tf")
OptimizerConfig = gin.external_configurable(trainer.OptimizerConfig, module="spinenet_tf")


# Experiments include fragments by their path under gin_configs/ ('models/spinenet49.gin').
CONFIG_DIR = Path(__file__).resolve().parents[2] / "gin_configs"


def parse(gin_files, gin_params, skip_unknown: bool = False):
    """Parses .gin files and overrides; an unknown binding raises naming it."""
    # gin_configs/ goes before the working directory: gin's package-resource lookup crashes
    # (TypeError) on an include such as 'data/shapes.gin' when the working directory holds a
    # directory 'data' without __init__.py, a namespace package to importlib.
    prefixes = getattr(gin.config, "_LOCATION_PREFIXES", None)
    if isinstance(prefixes, list):
        if str(CONFIG_DIR) not in prefixes:
            prefixes.insert(0, str(CONFIG_DIR))
    else:
        gin.add_config_file_search_path(str(CONFIG_DIR))
    # Files given on the command line are taken as paths (absolute paths skip the search).
    files = [os.path.abspath(f) if os.path.isfile(f) else str(f) for f in gin_files or []]
    gin.parse_config_files_and_bindings(files, list(gin_params or []), skip_unknown=skip_unknown)


def experiment_config() -> trainer.ExperimentConfig:
    """The ExperimentConfig the parsed gin files describe."""
    return ExperimentConfig()


def config_str() -> str:
    """Every parsed binding."""
    return gin.config_str()


def operative_config_str() -> str:
    """The bindings that were used to build the experiment."""
    return gin.operative_config_str()


def load_model(
    gin_files,
    gin_params,
    checkpoint: str,
    label_map_path: str | None = None,
    detection: dict | None = None,
    dtype_policy: str = "float32",
):
    """(model, label map) for an experiment's gin files and a training checkpoint (prefix or
    model_dir): the model `predict` and `export` serve.

    The label map comes from label_map_path (label map JSON or COCO annotations) or else from
    the experiment's data; `detection` overrides DetectionConfig fields (score_threshold,
    max_detections, ...). Raises ValueError / OSError naming a bad gin file, binding or
    checkpoint.
    """
    import dataclasses

    import keras

    from spinenet_tf.serving.label_map import label_map_for, read_label_map

    parse(gin_files, gin_params)
    config = experiment_config()
    keras.config.set_dtype_policy(dtype_policy)
    model = trainer.build_model(config, sync_batch_norm=False)
    trainer.restore_model(model, checkpoint)
    if detection:
        model.detection_config = dataclasses.replace(model.detection_config, **detection)
    label_map = read_label_map(label_map_path) if label_map_path else label_map_for(config)
    return model, label_map
