"""Image folders -> classification TFRecords, and the synthetic shapes classification data."""

import collections
import io
import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageFilter

from spinenet_tf.data import create_classification_tfrecord as cct
from spinenet_tf.data import shapes_classification
from spinenet_tf.data.label_map import read_label_map

FEATURES = {
    "image/encoded": tf.io.FixedLenFeature((), tf.string),
    "image/format": tf.io.FixedLenFeature((), tf.string),
    "image/class/label": tf.io.FixedLenFeature((), tf.int64),
    "image/class/text": tf.io.FixedLenFeature((), tf.string),
    "image/height": tf.io.FixedLenFeature((), tf.int64),
    "image/width": tf.io.FixedLenFeature((), tf.int64),
    "image/filename": tf.io.FixedLenFeature((), tf.string),
    "image/source_id": tf.io.FixedLenFeature((), tf.string),
}


def _save(path, mode, fmt, size):
    colour = {"L": 128, "RGBA": (255, 0, 0, 128), "RGB": (0, 0, 255)}[mode]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, format=fmt)


@pytest.fixture
def folder(tmp_path):
    """Three classes made in an order other than their sorted one, in mixed formats."""
    root = tmp_path / "images"
    _save(root / "zebra" / "b.jpg", "RGB", "JPEG", (40, 30))
    _save(root / "zebra" / "a.png", "RGB", "PNG", (20, 24))
    _save(root / "ant" / "gray.JPG", "L", "JPEG", (32, 16))
    _save(root / "mouse" / "rgba.png", "RGBA", "PNG", (16, 16))
    _save(root / "mouse" / "deeper" / "c.jpeg", "RGB", "JPEG", (18, 12))
    (root / "ant" / "notes.txt").write_text("not an image")
    (root / "mouse" / ".hidden.jpg").write_bytes(b"")
    return root


def _parse(pattern):
    files = sorted(tf.io.gfile.glob(pattern))
    dataset = tf.data.TFRecordDataset(files).map(lambda r: tf.io.parse_single_example(r, FEATURES))
    return {int(d["image/source_id"]): d for d in dataset}


def _convert(root, output, **kwargs):
    return cct.convert(root, str(output), num_shards=2, num_workers=0, verbose=False, **kwargs)


def test_round_trip(folder, tmp_path):
    counts = _convert(folder, tmp_path / "out" / "train")
    assert counts["images"] == 5 and counts["classes"] == 3
    assert counts["files ignored"] == 2
    assert counts["images of class zebra"] == 2 and counts["images of class ant"] == 1
    assert sorted(k for k in counts if k.startswith("images converted")) == [
        "images converted from JPEG L",
        "images converted from PNG RGB",
        "images converted from PNG RGBA",
    ]
    assert json.loads((tmp_path / "out" / "train.label_map.json").read_text()) == {
        "1": "ant",
        "2": "mouse",
        "3": "zebra",
    }
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "train-00000-of-00002.tfrecord",
        "train-00001-of-00002.tfrecord",
        "train.label_map.json",
    ]
    records = _parse(str(tmp_path / "out" / "train-*.tfrecord"))
    expected = [  # sorted by class folder, then file name
        ("ant/gray.JPG", 1, (16, 32)),
        ("mouse/deeper/c.jpeg", 2, (12, 18)),
        ("mouse/rgba.png", 2, (16, 16)),
        ("zebra/a.png", 3, (24, 20)),
        ("zebra/b.jpg", 3, (30, 40)),
    ]
    assert sorted(records) == [1, 2, 3, 4, 5]
    for source_id, (filename, label, size) in enumerate(expected, start=1):
        d = records[source_id]
        assert d["image/filename"].numpy().decode() == filename
        assert int(d["image/class/label"]) == label
        assert d["image/class/text"].numpy().decode() == filename.split("/")[0]
        assert d["image/format"].numpy() == b"jpeg"
        assert (int(d["image/height"]), int(d["image/width"])) == size
        with Image.open(io.BytesIO(d["image/encoded"].numpy())) as image:
            assert (image.format, image.mode, image.size[::-1]) == ("JPEG", "RGB", size)
        # What the training parser does with it.
        crop = tf.image.decode_and_crop_jpeg(d["image/encoded"], [0, 0, 8, 8], channels=3)
        assert crop.shape == (8, 8, 3)
    # An RGB JPEG is kept byte for byte; RGBA is composited on white (red at half -> pink).
    assert records[5]["image/encoded"].numpy() == (folder / "zebra" / "b.jpg").read_bytes()
    assert tf.io.decode_jpeg(records[3]["image/encoded"]).numpy()[8, 8].tolist()[2] > 100


def test_model_garden_decoder_reads_our_records(folder, tmp_path):
    decoder_lib = pytest.importorskip("official.vision.dataloaders.classification_input")
    _convert(folder, tmp_path / "r")
    records = tf.data.TFRecordDataset(tf.io.gfile.glob(str(tmp_path / "r-*.tfrecord")))
    labels = [int(decoder_lib.Decoder().decode(r)["image/class/label"]) for r in records]
    assert collections.Counter(labels) == {1: 1, 2: 2, 3: 2}


def test_the_same_input_gives_identical_shards(folder, tmp_path):
    _convert(folder, tmp_path / "a")
    cct.convert(folder, str(tmp_path / "b"), num_shards=2, num_workers=2, verbose=False)
    for name in ("-00000-of-00002.tfrecord", "-00001-of-00002.tfrecord", ".label_map.json"):
        assert (tmp_path / f"a{name}").read_bytes() == (tmp_path / f"b{name}").read_bytes()


def test_label_map_gives_the_ids(folder, tmp_path):
    label_map = tmp_path / "given.label_map.json"
    label_map.write_text(json.dumps({"7": "zebra", "3": "ant", "5": "mouse", "9": "unseen"}))
    _convert(folder, tmp_path / "val", label_map=str(label_map))
    labels = {
        d["image/filename"].numpy().decode(): int(d["image/class/label"])
        for d in _parse(str(tmp_path / "val-*.tfrecord")).values()
    }
    assert labels == {
        "ant/gray.JPG": 3,
        "mouse/deeper/c.jpeg": 5,
        "mouse/rgba.png": 5,
        "zebra/a.png": 7,
        "zebra/b.jpg": 7,
    }
    # The whole given map, so that both splits agree on the number of classes.
    assert read_label_map(str(tmp_path / "val.label_map.json")) == {
        3: "ant",
        5: "mouse",
        7: "zebra",
        9: "unseen",
    }
    label_map.write_text(json.dumps({"1": "ant", "2": "zebra"}))
    with pytest.raises(cct.ClassificationFormatError, match="'mouse'.*given.label_map.json"):
        _convert(folder, tmp_path / "x", label_map=str(label_map))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda root: root.rename(root.with_name("gone")), "images does not exist"),
        (lambda root: (root / "empty").mkdir(), "class folder .*empty has no images"),
        (lambda root: _save(root / "loose.png", "RGB", "PNG", (8, 8)), "loose.png is directly"),
        (lambda root: (root / "ant" / "gray.JPG").unlink(), "class folder .*ant has no images"),
    ],
)
def test_layout_errors_are_named_before_any_shard(folder, tmp_path, edit, match):
    edit(folder)
    with pytest.raises(cct.ClassificationFormatError, match=match):
        _convert(folder, tmp_path / "out" / "x")
    assert not (tmp_path / "out").exists()


def test_no_class_folders_is_an_error(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "readme.txt").write_text("")
    with pytest.raises(cct.ClassificationFormatError, match="flat has no class sub-folders"):
        _convert(tmp_path / "flat", tmp_path / "x")


def test_corrupt_image_is_named_or_skipped(folder, tmp_path):
    (folder / "mouse" / "rgba.png").write_bytes(b"not a png")
    with pytest.raises(cct.ClassificationFormatError, match="mouse/rgba.png cannot be decoded"):
        _convert(folder, tmp_path / "out" / "x")
    assert list((tmp_path / "out").iterdir()) == []

    counts = _convert(folder, tmp_path / "out" / "x", skip_bad_images=True)
    assert counts["images"] == 4 and counts["bad images skipped"] == 1
    assert counts["skipped mouse/rgba.png"] == 1
    assert "  skipped mouse/rgba.png" in cct.format_counts(counts).splitlines()
    records = _parse(str(tmp_path / "out" / "x-*.tfrecord"))
    assert sorted(records) == [1, 2, 4, 5]  # source ids stay those of the sorted file list


def test_shapes_classification_dataset(tmp_path):
    sizes = dict(num_train=16, num_val=8, image_size=48, seed=3, num_shards=2)
    paths = shapes_classification.ensure_dataset(tmp_path / "a", **sizes)
    assert read_label_map(paths["label_map"]) == {
        1: "ellipse",
        2: "rectangle",
        3: "star",
        4: "triangle",
    }
    assert read_label_map(str(tmp_path / "a" / "records" / "val.label_map.json")) == (
        read_label_map(paths["label_map"])
    )
    for split, per_class in (("train", 4), ("val", 2)):
        records = _parse(paths[split])
        labels = collections.Counter(int(d["image/class/label"]) for d in records.values())
        assert labels == {1: per_class, 2: per_class, 3: per_class, 4: per_class}
        for d in records.values():
            assert 36 <= int(d["image/height"]) <= 48 and 36 <= int(d["image/width"]) <= 48
            name = d["image/filename"].numpy().decode().split("/")[0]
            assert d["image/class/text"].numpy().decode() == name
    assert len(tf.io.gfile.glob(paths["images"])) == 8

    shards = sorted((tmp_path / "a" / "records").glob("*.tfrecord"))
    mtimes = [p.stat().st_mtime_ns for p in shards]
    assert shapes_classification.ensure_dataset(tmp_path / "a", **sizes) == paths
    assert [p.stat().st_mtime_ns for p in shards] == mtimes

    shapes_classification.ensure_dataset(tmp_path / "b", **sizes)
    for a in shards + sorted((tmp_path / "a" / "images").rglob("*.jpg")):
        assert a.read_bytes() == (tmp_path / "b" / a.relative_to(tmp_path / "a")).read_bytes()

    before = shards[0].read_bytes()
    shapes_classification.ensure_dataset(tmp_path / "a", **dict(sizes, seed=4))
    assert shards[0].read_bytes() != before
    done = tmp_path / "a" / "records" / "DONE"
    assert json.loads(done.read_text())[:5] == [shapes_classification.VERSION, 16, 8, 48, 4]
    # Data drawn by an older version of the generator is drawn again.
    done.write_text(
        json.dumps([shapes_classification.VERSION - 1, *json.loads(done.read_text())[1:]])
    )
    shapes_classification.ensure_dataset(tmp_path / "a", **dict(sizes, seed=4))
    assert json.loads(done.read_text())[0] == shapes_classification.VERSION


def test_shapes_lie_whole_inside_the_centred_square():
    """What the evaluation's centre crop of 1.0 keeps: an image differs from its background
    (blurred alone) only inside the centred square of the shorter side, grown by the blur's
    reach, and the long side's ends are pure background."""
    for seed, (h, w) in enumerate([(48, 64), (64, 48), (56, 56), (40, 60)] * 4):
        category = seed % 4 + 1
        background = shapes_classification._background(np.random.default_rng(seed), h, w)
        blurred = np.asarray(background.filter(ImageFilter.GaussianBlur(0.6)), np.int16)
        image = shapes_classification._draw_image(np.random.default_rng(seed), category, h, w)
        ys, xs = np.nonzero((np.asarray(image, np.int16) != blurred).any(axis=-1))
        assert len(ys), (seed, h, w)  # a shape is drawn
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        # The shape stays 1 pixel inside the square; GaussianBlur(0.6) reaches 3 pixels.
        assert top - 2 <= ys.min() and ys.max() < top + side + 2, (seed, h, w)
        assert left - 2 <= xs.min() and xs.max() < left + side + 2, (seed, h, w)


def test_generate_replaces_the_images_of_an_earlier_run(tmp_path):
    folders = shapes_classification.generate(tmp_path, num_train=8, num_val=0, image_size=64)
    for path in folders["train"].glob("*/*.jpg"):
        with Image.open(path) as image:
            assert image.mode == "RGB" and 48 <= min(image.size) <= max(image.size) <= 64
    shapes_classification.generate(tmp_path, num_train=4, num_val=0, image_size=64)
    assert len(list(folders["train"].glob("*/*.jpg"))) == 4


def test_cli_lists_skipped_images(folder, tmp_path):
    import subprocess
    import sys

    (folder / "zebra" / "a.png").write_bytes(b"\x89PNG broken")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "spinenet_tf.data.create_classification_tfrecord",
            f"--image_dir={folder}",
            f"--output={tmp_path / 'train'}",
            "--num_shards=3",
            "--num_workers=2",
            "--skip_bad_images",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert "4 images in 3 classes" in lines and "  skipped zebra/a.png" in lines
    assert len(_parse(str(tmp_path / "train-*-of-00003.tfrecord"))) == 4
