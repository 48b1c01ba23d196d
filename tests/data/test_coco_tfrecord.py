"""COCO -> TFRecord: real COCO's quirks, errors that name the culprit, Model Garden's decoder."""

import io
import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from spinenet_tf.data import create_coco_tfrecord as cct
from spinenet_tf.data import shapes
from spinenet_tf.data.decoders import decode_example


def _save(path, mode, fmt, size=(40, 30)):
    colour = {"L": 128, "CMYK": (0, 128, 0, 0), "RGBA": (255, 0, 0, 128), "RGB": (0, 0, 255)}
    Image.new(mode, size, colour[mode]).save(path, format=fmt)


def _ann(ann_id, image_id, category_id, bbox, segmentation=None, iscrowd=0):
    x, y, w, h = bbox
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "area": w * h,
        "iscrowd": iscrowd,
        "segmentation": segmentation or [[x, y, x + w, y, x + w, y + h, x, y + h]],
    }


@pytest.fixture
def quirky_coco(tmp_path):
    """Every COCO quirk the converter must handle, in five 40x30 images."""
    images = tmp_path / "images"
    images.mkdir()
    specs = [("rgb.jpg", "RGB", "JPEG"), ("gray.jpg", "L", "JPEG"), ("cmyk.jpg", "CMYK", "JPEG")]
    specs += [("rgba.png", "RGBA", "PNG"), ("empty.jpg", "RGB", "JPEG")]
    for name, mode, fmt in specs:
        _save(images / name, mode, fmt)
    coco = {
        "images": [
            {"id": i + 1, "file_name": n, "height": 30, "width": 40}
            for i, (n, _, _) in enumerate(specs)
        ],
        "categories": [{"id": 1, "name": "one"}, {"id": 90, "name": "ninety"}],
        "annotations": [
            _ann(1, 1, 1, [2, 3, 10, 8]),
            # Two-part polygon.
            _ann(2, 1, 90, [20, 5, 15, 20], [[20, 5, 25, 5, 25, 10], [30, 20, 35, 20, 35, 25]]),
            # Crowd region with uncompressed RLE, as COCO stores them.
            _ann(3, 2, 1, [0, 0, 5, 30], {"size": [30, 40], "counts": [0, 150, 1050]}, 1),
            _ann(4, 3, 90, [5, 5, 0, 10]),  # zero width: dropped and counted
            _ann(5, 4, 1, [30, 20, 20, 20]),  # past the right and bottom edges: clipped
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    return images, path


def _records(pattern):
    return list(tf.data.TFRecordDataset(tf.io.gfile.glob(pattern)))


def test_quirks_are_kept_repaired_or_counted(quirky_coco, tmp_path):
    images, annotations = quirky_coco
    counts = cct.convert(images, annotations, str(tmp_path / "out" / "train"), 2, True, 0, False)
    assert counts["images"] == 5
    assert counts["instances"] == 4
    assert counts["crowd instances"] == 1
    assert counts["annotations dropped: zero width or height"] == 1
    assert counts["boxes clipped to the image"] == 1
    converted = [k for k in counts if k.startswith("images converted")]
    assert sorted(converted) == [
        "images converted from JPEG CMYK",
        "images converted from JPEG L",
        "images converted from PNG RGBA",
    ]
    assert json.loads((tmp_path / "out" / "train.label_map.json").read_text()) == {
        "1": "one",
        "90": "ninety",
    }
    decoded = {
        int(d["source_id"]): d
        for d in (
            decode_example(r, include_masks=True)
            for r in _records(str(tmp_path / "out/train-*.tfrecord"))
        )
    }
    assert sorted(decoded) == [1, 2, 3, 4, 5]  # the empty image is kept
    for d in decoded.values():
        assert d["image"].shape == (30, 40, 3)
    np.testing.assert_array_equal(decoded[1]["classes"], [1, 90])  # COCO's own ids
    np.testing.assert_allclose(decoded[1]["boxes"][0], [3 / 30, 2 / 40, 11 / 30, 12 / 40])
    # Both polygon parts are in the mask: 2 triangles of 12.5 px each, rasterised.
    assert 15 <= int(decoded[1]["masks"][1].numpy().sum()) <= 60
    assert bool(decoded[2]["is_crowd"][0])
    # Column-major RLE: 0 zeros, then 150 ones = the first 5 columns.
    assert (
        decoded[2]["masks"][0].numpy()[:, :5].all() and decoded[2]["masks"][0].numpy().sum() == 150
    )
    assert decoded[3]["classes"].shape == (0,)
    np.testing.assert_allclose(decoded[4]["boxes"][0], [20 / 30, 30 / 40, 1.0, 1.0])
    assert decoded[5]["boxes"].shape == (0, 4)
    assert not np.isnan(
        np.concatenate([d["boxes"].numpy().ravel() for d in decoded.values()])
    ).any()
    # RGBA is composited on white: a half-transparent red becomes pink, not black.
    assert decoded[4]["image"].numpy()[0, 0].tolist()[0] > 250


def test_model_garden_decoder_reads_our_records(quirky_coco, tmp_path):
    decoder_lib = pytest.importorskip("official.vision.dataloaders.tf_example_decoder")
    images, annotations = quirky_coco
    cct.convert(images, annotations, str(tmp_path / "r"), 1, True, 0, False)
    mg = decoder_lib.TfExampleDecoder(include_mask=True)
    for record in _records(str(tmp_path / "r-*.tfrecord")):
        theirs, ours = mg.decode(record), decode_example(record, include_masks=True)
        np.testing.assert_array_equal(theirs["image"], ours["image"])
        np.testing.assert_allclose(theirs["groundtruth_boxes"], ours["boxes"])
        np.testing.assert_array_equal(theirs["groundtruth_classes"], ours["classes"])
        np.testing.assert_array_equal(theirs["groundtruth_is_crowd"], ours["is_crowd"])
        np.testing.assert_allclose(theirs["groundtruth_area"], ours["areas"])
        np.testing.assert_array_equal(theirs["groundtruth_instance_masks"], ours["masks"])
        assert int(theirs["source_id"]) == int(ours["source_id"])


def test_missing_image_stops_before_any_shard(quirky_coco, tmp_path):
    images, annotations = quirky_coco
    (images / "gray.jpg").unlink()
    with pytest.raises(cct.CocoFormatError, match="gray.jpg"):
        cct.convert(images, annotations, str(tmp_path / "out" / "x"), 2, False, 0, False)
    assert not (tmp_path / "out").exists()


def test_undecodable_image_leaves_no_shards(quirky_coco, tmp_path):
    images, annotations = quirky_coco
    (images / "rgba.png").write_bytes(b"not a png")
    with pytest.raises(cct.CocoFormatError, match="rgba.png"):
        cct.convert(images, annotations, str(tmp_path / "out" / "x"), 2, False, 0, False)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c["annotations"][1].update(image_id=77), "annotation id 2 .*image_id 77"),
        (lambda c: c["annotations"][2].update(category_id=3), "annotation id 3 .*category_id 3"),
        (lambda c: c["annotations"][0].update(bbox=[1, 2, 3]), "annotation id 1 .*bbox"),
        (lambda c: c["annotations"][4].update(bbox=[1, 2, float("nan"), 3]), "annotation id 5"),
    ],
)
def test_malformed_annotations_are_named(quirky_coco, tmp_path, edit, match):
    _, path = quirky_coco
    coco = json.loads(path.read_text())
    edit(coco)
    path.write_text(json.dumps(coco))
    with pytest.raises(cct.CocoFormatError, match=match):
        cct.load_annotations(path)


def test_malformed_json_is_named(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [')
    with pytest.raises(cct.CocoFormatError, match="broken.json"):
        cct.load_annotations(path)


def test_cli_converts_with_worker_processes(shapes_dir, tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "spinenet_tf.data.create_coco_tfrecord",
            f"--image_dir={shapes.image_dir(shapes_dir, 'val')}",
            f"--annotations={shapes.annotation_path(shapes_dir, 'val')}",
            f"--output={tmp_path / 'val'}",
            "--num_shards=3",
            "--num_workers=2",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    coco = json.loads(shapes.annotation_path(shapes_dir, "val").read_text())
    assert f"{len(coco['images'])} images, {len(coco['annotations'])} instances" in result.stdout
    assert len(_records(str(tmp_path / "val-*-of-00003.tfrecord"))) == len(coco["images"])


def test_shapes_are_reproducible_and_consistent(tmp_path):
    a = shapes.generate(tmp_path / "a", 6, 2, 64, seed=5)
    b = shapes.generate(tmp_path / "b", 6, 2, 64, seed=5)
    assert a["train"].read_bytes() == b["train"].read_bytes()
    for f in sorted((tmp_path / "a" / "train").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / "train" / f.name).read_bytes()
    coco = json.loads(a["train"].read_text())
    assert {c["name"] for c in coco["categories"]} == {"ellipse", "rectangle", "triangle", "star"}
    from pycocotools import mask as mask_utils

    for ann in coco["annotations"]:
        image = next(i for i in coco["images"] if i["id"] == ann["image_id"])
        assert 48 <= image["height"] <= 64 and 48 <= image["width"] <= 64
        rle = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
        np.testing.assert_allclose(mask_utils.toBbox(rle), ann["bbox"])
        assert mask_utils.area(rle) == ann["area"] > 0
        with Image.open(
            io.BytesIO((tmp_path / "a" / "train" / image["file_name"]).read_bytes())
        ) as im:
            assert im.size == (image["width"], image["height"]) and im.mode == "RGB"
