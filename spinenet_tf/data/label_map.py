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


def label_map_for(config) -> dict[int, str]:
    """The label map of an ExperimentConfig's data: the evaluation annotation file's
    categories (the synthetic shapes data's when it is the source), else the label map beside
    the training (or evaluation) records; {} if none."""
    if config.eval.annotation_file and tf.io.gfile.exists(config.eval.annotation_file):
        return read_label_map(config.eval.annotation_file)
    if config.synthetic_data_dir and not config.eval.source:
        annotations = shapes.annotation_path(config.synthetic_data_dir, "val")
        if tf.io.gfile.exists(str(annotations)):
            return read_label_map(str(annotations))
    for data in (config.train, config.eval):
        source = data.source
        if not source or source.startswith("tfds:"):
            continue
        # Shards PREFIX-00000-of-00004.tfrecord or a pattern PREFIX-*.tfrecord: the label map
        # is PREFIX.label_map.json.
        prefix = re.sub(r"(-\d+-of-\d+)?(\.tfrecord)?$", "", source.split("*", 1)[0].rstrip("-"))
        if tf.io.gfile.exists(prefix + ".label_map.json"):
            return read_label_map(prefix + ".label_map.json")
    return {}
