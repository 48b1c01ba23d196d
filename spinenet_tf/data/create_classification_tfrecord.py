"""A folder of class sub-folders -> sharded TFRecords of tf.Examples in the classification schema.

    python -m spinenet_tf.data.create_classification_tfrecord --image_dir=ROOT \
        --output=PREFIX --num_shards=N [--label_map=PATH] [--skip_bad_images]

ROOT holds one sub-folder per class (ROOT/<class name>/<images>, sub-folders of a class
folder included), the layout of Keras' image_dataset_from_directory and torchvision's
ImageFolder. The records follow tensorflow/tpu's ImageNet converter and Model Garden's
classification decoder: image/encoded (always JPEG: tensorflow/tpu's training parser crops
with tf.image.decode_and_crop_jpeg), image/class/label, image/class/text and the image's
size, file name and source id, in a fixed shuffled order. Class ids are 1..K over the sorted
folder names (0 stays unused, as in tensorflow/tpu, where ImageNet has 1001 classes), or the
ids of --label_map, so that a validation split gets the training split's ids. The label map
is written to PREFIX.label_map.json. Folders are checked before the first shard is opened;
shards are written under temporary names and renamed at the end, so a failure never leaves
a half-written dataset.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
from PIL import Image
from tensorflow.core.example import example_pb2, feature_pb2

from spinenet_tf.data.create_coco_tfrecord import (
    CocoFormatError,
    _feature,
    _read_image,
    label_map_path,
    shard_paths,
)

# What PIL reads; anything else in a class folder is counted as ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
LAYOUT = "expected ROOT/<class name>/<image files>"


class ClassificationFormatError(ValueError):
    """The image folder breaks the ROOT/<class>/<images> layout or holds a bad image; the
    message names which."""


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _images_of_class(folder: Path, root: Path, counts) -> list[str]:
    found = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if _is_image(name):
                found.append((Path(parent) / name).relative_to(root).as_posix())
            else:
                counts["files ignored"] += 1
    return sorted(found)


def find_images(image_dir) -> tuple[dict[str, list[str]], collections.Counter]:
    """({class folder name: sorted image paths relative to image_dir}, counts of ignored
    files); raises ClassificationFormatError when the layout is not ROOT/<class>/<images>."""
    root = Path(image_dir)
    if not root.is_dir():
        raise ClassificationFormatError(f"image_dir {root} does not exist or is not a folder")
    counts = collections.Counter()
    classes = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):  # .ipynb_checkpoints, .DS_Store, ...
            counts["files ignored"] += 1
        elif entry.is_dir():
            classes[entry.name] = _images_of_class(entry, root, counts)
        elif _is_image(entry.name):
            raise ClassificationFormatError(
                f"image {entry} is directly in image_dir, not in a class folder; {LAYOUT}"
            )
        else:
            counts["files ignored"] += 1
    if not classes:
        raise ClassificationFormatError(f"image_dir {root} has no class sub-folders; {LAYOUT}")
    empty = [name for name, files in classes.items() if not files]
    if empty:
        raise ClassificationFormatError(
            f"class folder {root / empty[0]} has no images ({len(empty)} empty class "
            f"folder(s)); image files end in {', '.join(IMAGE_EXTENSIONS)}"
        )
    return classes, counts


def class_ids(class_names, label_map: str | None = None) -> dict[int, str]:
    """{id: name} of the classes: 1..K over the sorted names, or label_map's (a label map
    file) when given, where every name must be."""
    if label_map is None:
        return {k + 1: name for k, name in enumerate(sorted(class_names))}
    from spinenet_tf.data.label_map import read_label_map

    if not Path(label_map).is_file():
        raise ClassificationFormatError(f"label map {label_map} does not exist")
    names = read_label_map(label_map)
    duplicated = sorted(n for n, k in collections.Counter(names.values()).items() if k > 1)
    if duplicated:
        raise ClassificationFormatError(
            f"label map {label_map} gives class {duplicated[0]!r} more than one id"
        )
    unknown = sorted(set(class_names) - set(names.values()))
    if unknown:
        raise ClassificationFormatError(
            f"class folder {unknown[0]!r} ({len(unknown)} unknown) is not in label map "
            f"{label_map}, which has {sorted(names.values())}"
        )
    return names


def _read_jpeg(path: Path, counts) -> tuple[bytes, int, int]:
    """RGB JPEG bytes of an image file, re-encoded unless it is RGB JPEG already."""
    local = collections.Counter()
    try:
        data, fmt, height, width = _read_image(path, local)
        if fmt == "png":  # _read_image keeps RGB PNG and re-encodes other non-JPEGs as PNG
            if not local:
                local["images converted from PNG RGB"] += 1
            out = io.BytesIO()
            with Image.open(io.BytesIO(data)) as image:
                image.save(out, format="JPEG", quality=95)
            data = out.getvalue()
    except CocoFormatError as e:
        raise ClassificationFormatError(str(e)) from None
    except (SyntaxError, ValueError, Image.DecompressionBombError) as e:  # PIL's other errors
        raise ClassificationFormatError(f"image {path} cannot be decoded: {e}") from None
    except OSError as e:  # unreadable file; _read_image turns decoding OSErrors into the above
        raise ClassificationFormatError(f"image {path} cannot be read: {e}") from None
    counts.update(local)
    return data, height, width


def build_example(image_dir, filename: str, label: int, name: str, source_id: int):
    """(serialized tf.Example, counts of conversions) for one image file."""
    counts = collections.Counter()
    data, height, width = _read_jpeg(Path(image_dir) / filename, counts)
    features = {
        "image/encoded": data,
        "image/format": b"jpeg",
        "image/class/label": label,
        "image/class/text": name.encode("utf8"),
        "image/height": height,
        "image/width": width,
        "image/filename": filename.encode("utf8"),
        "image/source_id": str(source_id).encode("utf8"),
    }
    example = example_pb2.Example(
        features=feature_pb2.Features(feature={k: _feature(v) for k, v in features.items()})
    )
    counts["images"] += 1
    counts[f"images of class {name}"] += 1
    return example.SerializeToString(), counts


def _build(job):
    image_dir, filename, label, name, source_id, skip_bad_images = job
    try:
        return build_example(image_dir, filename, label, name, source_id)
    except ClassificationFormatError:
        if not skip_bad_images:
            raise
        return None, collections.Counter({"bad images skipped": 1, f"skipped {filename}": 1})


def _write_shards(records, paths: list[str]) -> None:
    """Writes records round-robin to paths under .tmp names, renamed once all are written."""
    import tensorflow as tf

    temporary = [p + ".tmp" for p in paths]
    try:
        with contextlib.ExitStack() as stack:
            writers = [stack.enter_context(tf.io.TFRecordWriter(t)) for t in temporary]
            for i, record in enumerate(records):
                writers[i % len(writers)].write(record)
    except BaseException:
        for t in temporary:
            Path(t).unlink(missing_ok=True)
        raise
    for t, p in zip(temporary, paths, strict=True):
        os.replace(t, p)


def convert(
    image_dir,
    output: str,
    num_shards: int = 8,
    label_map: str | None = None,
    skip_bad_images: bool = False,
    num_workers: int | None = None,
    verbose: bool = True,
) -> collections.Counter:
    """Converts one split; returns counts of images (in all and per class), classes, ignored
    files, conversions and, with skip_bad_images, the skipped files ("skipped PATH")."""
    import keras

    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    classes, totals = find_images(image_dir)
    names = class_ids(classes, label_map)
    ids = {name: i for i, name in names.items()}
    files = [(f, name) for name in sorted(classes) for f in classes[name]]
    # Written in a fixed shuffled order (as tensorflow/tpu's ImageNet converter does), so
    # that any stretch of the records, e.g. the first evaluation batch drawn, mixes the
    # classes; source ids stay the sorted positions.
    order = np.random.default_rng(0).permutation(len(files))
    jobs = [
        (image_dir, f, ids[name], name, source_id, skip_bad_images)
        for source_id, (f, name) in sorted(
            enumerate(files, start=1), key=lambda item: order[item[0] - 1]
        )
    ]
    totals["classes"] = len(classes)

    paths = shard_paths(output, num_shards)
    Path(paths[0]).parent.mkdir(parents=True, exist_ok=True)
    num_workers = os.cpu_count() if num_workers is None else num_workers
    progress = keras.utils.Progbar(len(jobs), unit_name="image") if verbose else None

    def records(results):
        for i, (record, counts) in enumerate(results):
            totals.update(counts)
            if progress:
                progress.update(i + 1)
            if record is not None:
                yield record

    # Fork, not spawn: workers use only PIL and protobuf.
    pool = multiprocessing.get_context("fork").Pool(num_workers) if num_workers > 1 else None
    with pool or contextlib.nullcontext():  # a pool's exit terminates its workers
        _write_shards(records(pool.imap(_build, jobs, 8) if pool else map(_build, jobs)), paths)
    Path(label_map_path(output)).write_text(
        json.dumps({str(i): name for i, name in sorted(names.items())})
    )
    return totals


def format_counts(counts: collections.Counter) -> str:
    lines = [f"{counts['images']} images in {counts['classes']} classes"]
    lines += [f"  {k}: {v}" for k, v in sorted(counts.items()) if k.startswith("images ")]
    lines += [f"  {k}: {counts[k]}" for k in ("files ignored", "bad images skipped") if counts[k]]
    lines += [f"  {k}" for k in sorted(counts) if k.startswith("skipped ")]
    return "\n".join(lines)


def main(argv):
    del argv
    from absl import flags

    f = flags.FLAGS
    counts = convert(
        f.image_dir,
        f.output,
        f.num_shards,
        f.label_map,
        f.skip_bad_images,
        f.num_workers,
    )
    print(format_counts(counts))


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("image_dir", None, "ROOT of ROOT/<class name>/<image files>.")
    flags.DEFINE_string("output", None, "Output prefix: PREFIX-00000-of-00008.tfrecord, ...")
    flags.DEFINE_integer("num_shards", 8, "Number of output shards.")
    flags.DEFINE_string(
        "label_map", None, "Label map {id: name} whose ids to use (the training split's)."
    )
    flags.DEFINE_boolean("skip_bad_images", False, "Skip and list undecodable images.")
    flags.DEFINE_integer("num_workers", None, "Worker processes (default: all cores).")
    for name in ("image_dir", "output"):
        flags.mark_flag_as_required(name)
    app.run(main)
