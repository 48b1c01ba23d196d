"""Label maps from converter output, COCO annotations and experiments; num_classes from them."""

import pytest

from spinenet_tf.data import shapes
from spinenet_tf.data.label_map import label_map_for, read_label_map, resolve_num_classes
from spinenet_tf.training.config import DataConfig, ExperimentConfig

LABELS = {1: "ellipse", 2: "rectangle", 3: "triangle", 4: "star"}


def test_label_maps_from_records_annotations_and_experiments(shapes_dir, shapes_records, tmp_path):
    from_json = read_label_map(str(shapes.annotation_path(shapes_dir, "val")))
    assert from_json == LABELS
    prefix = shapes_records["train"].split("-*")[0]
    assert read_label_map(prefix + ".label_map.json") == LABELS
    config = ExperimentConfig(train=DataConfig(source=shapes_records["train"]))
    assert label_map_for(config) == LABELS
    config = ExperimentConfig(train=DataConfig(source=prefix + "-00001-of-00002.tfrecord"))
    assert label_map_for(config) == LABELS
    assert label_map_for(ExperimentConfig(synthetic_data_dir=str(shapes_dir))) == LABELS
    assert label_map_for(ExperimentConfig(train=DataConfig(source="tfds:coco/2017:train"))) == {}
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="bad.json"):
        read_label_map(str(bad))


def test_num_classes_from_the_label_map_or_checked_against_it(shapes_records):
    data = DataConfig(source=shapes_records["train"])
    assert resolve_num_classes(ExperimentConfig(train=data)) == 5
    assert resolve_num_classes(ExperimentConfig(train=data, num_classes=91)) == 91
    with pytest.raises(ValueError, match=r"num_classes = 4 is too small: category id 4 \('star'\)"):
        resolve_num_classes(ExperimentConfig(train=data, num_classes=4))
    with pytest.raises(ValueError, match="num_classes is not set and the data has no label map"):
        resolve_num_classes(ExperimentConfig(train=DataConfig(source="tfds:coco/2017:train")))
