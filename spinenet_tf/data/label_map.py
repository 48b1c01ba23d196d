"""Label maps (category id -> name) from the files the data tools write."""

from __future__ import annotations

import json
import re

import tensorflow as tf

from spinenet_tf.data import shapes


def read_label_map(path: str) -> dict[int, str]:
    """Reads {id: name} from a label map JSON (PREFIX.label_map.json of create_coco_tfrecord:
    {"1": "person", ...}) or from a COCO annotation file's "categories"."""
    try:
        with tf.io.gfile.GFile(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"label map {path} is not JSON: {e}") from None
    if isinstance(data, dict) and "categories" in data:
        try:
            return {int(c["id"]): str(c["name"]) for c in data["categories"]}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"label map {path}: a category lacks an integer id or name ({e})"
            ) from None
    if isinstance(data, dict):
        try:
            return {int(k): str(v) for k, v in data.items()}
        except ValueError:
            pass
    raise ValueError(
        f"label map {path} is neither {{id: name}} JSON nor a COCO annotation file with "
        "'categories'"
    )


def find_label_map(config) -> str | None:
    """The label map file of an ExperimentConfig's data: the evaluation annotation file (the
    synthetic shapes data's when it is the source), else the label map beside the training
    (or evaluation) records; None if there is none."""
    if config.eval.annotation_file and tf.io.gfile.exists(config.eval.annotation_file):
        return config.eval.annotation_file
    if config.synthetic_data_dir and not config.eval.source:
        annotations = str(shapes.annotation_path(config.synthetic_data_dir, "val"))
        if tf.io.gfile.exists(annotations):
            return annotations
    for data in (config.train, config.eval):
        source = data.source
        if not source or source.startswith("tfds:"):
            continue
        # Shards PREFIX-00000-of-00004.tfrecord or a pattern PREFIX-*.tfrecord: the label map
        # is PREFIX.label_map.json.
        prefix = re.sub(r"(-\d+-of-\d+)?(\.tfrecord)?$", "", source.split("*", 1)[0].rstrip("-"))
        if tf.io.gfile.exists(prefix + ".label_map.json"):
            return prefix + ".label_map.json"
    return None


def label_map_for(config) -> dict[int, str]:
    """The label map of an ExperimentConfig's data (`find_label_map`); {} if none."""
    path = find_label_map(config)
    return read_label_map(path) if path else {}


class LabelMapError(ValueError):
    """num_classes and the data's label map disagree, or neither gives the class count."""


def data_classes(config) -> tuple[int, dict[int, str]]:
    """(num_classes, label map) of an ExperimentConfig, the label map read once: num_classes
    is config.num_classes checked against the data's label map (`find_label_map`) or, when
    None, the label map's largest category id + 1 (class 0 is background).

    Raises LabelMapError before anything is built when num_classes is too small for a
    category id (naming the largest id, its name and the label map), or when it is None and
    the data has no label map.
    """
    path = find_label_map(config)
    names = read_label_map(path) if path else {}
    if config.num_classes is None:
        if not names:
            raise LabelMapError(
                "ExperimentConfig.num_classes is not set and the data has no label map "
                "(PREFIX.label_map.json beside the records, or eval annotation_file): set "
                "num_classes to the largest category id + 1"
            )
        return max(names) + 1, names
    if names and max(names) >= config.num_classes:
        largest = max(names)
        raise LabelMapError(
            f"ExperimentConfig.num_classes = {config.num_classes} is too small: category id "
            f"{largest} ({names[largest]!r}) in {path} needs num_classes >= {largest + 1} "
            "(ids are used as they are; 0 is background); set it, or leave it unset to take "
            "it from the label map"
        )
    return config.num_classes, names


def resolve_num_classes(config) -> int:
    """The class count of `data_classes`."""
    return data_classes(config)[0]
