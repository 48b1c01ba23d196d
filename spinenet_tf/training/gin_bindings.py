"""The one place gin meets the code: every configurable the .gin files may bind.

Modeling code carries no gin decorators (they break Keras 3's config capture); experiments
bind these constructors by name from gin_configs/: the configs, and the task
(`ExperimentConfig.task = @RetinaNetTask()`). Other tasks join through `register_task`.
"""

from __future__ import annotations

import os
from pathlib import Path

import gin

from spinenet_tf.tasks.classification import ClassificationTask
from spinenet_tf.tasks.maskrcnn import MaskRCNNTask
from spinenet_tf.tasks.retinanet import RetinaNetTask
from spinenet_tf.training import config as config_lib

ExperimentConfig = gin.external_configurable(config_lib.ExperimentConfig, module="spinenet_tf")
DataConfig = gin.external_configurable(config_lib.DataConfig, module="spinenet_tf")
OptimizerConfig = gin.external_configurable(config_lib.OptimizerConfig, module="spinenet_tf")


def register_task(task_class: type, name: str | None = None):
    """Makes a Task class bindable from .gin files (`ExperimentConfig.task = @MyTask()`), by
    `name` or its class name; returns what gin calls. Tasks of other packages register
    here, so the trainer needs no change to run them."""
    return gin.external_configurable(task_class, name=name, module="spinenet_tf")


register_task(RetinaNetTask)
register_task(ClassificationTask)
register_task(MaskRCNNTask)


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


def experiment_config() -> config_lib.ExperimentConfig:
    """The ExperimentConfig the parsed gin files describe."""
    return ExperimentConfig()


def config_str() -> str:
    """Every parsed binding."""
    return gin.config_str()


def operative_config_str() -> str:
    """The bindings that were used to build the experiment."""
    return gin.operative_config_str()
