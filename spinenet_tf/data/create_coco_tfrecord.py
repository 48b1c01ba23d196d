"""COCO JSON + images -> sharded TFRecords of tf.Examples in Model Garden's COCO schema.

    python -m spinenet_tf.data.create_coco_tfrecord --image_dir=DIR \
        --annotations=instances_train2017.json --output=PREFIX --num_shards=N [--include_masks]

Labels are the dataset's own category ids (COCO: 1-90 for 80 classes); the label map is
written to PREFIX.label_map.json. Everything is checked before the first shard is opened, and
shards are written under temporary names and renamed at the end, so a failure never leaves a
half-written dataset.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import math
import multiprocessing
import os
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tensorflow.core.example import example_pb2, feature_pb2


class CocoFormatError(ValueError):
    """The annotation file or an image breaks the COCO format; the message names which."""


def _feature(values) -> feature_pb2.Feature:
    values = values if isinstance(values, (list, tuple)) else [values]
    if values and isinstance(values[0], bytes):
        return feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=values))
    if values and isinstance(values[0], (int, np.integer)):
        return feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=values))
    return feature_pb2.Feature(float_list=feature_pb2.FloatList(value=values))


def load_annotations(path) -> dict:
    """Reads and validates a COCO instances file; errors name the file and the record."""
    path = Path(path)
    try:
        coco = json.loads(path.read_text())
    except FileNotFoundError:
        raise CocoFormatError(f"annotation file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CocoFormatError(f"annotation file {path} is not valid JSON: {e}") from None
    for key in ("images", "categories"):
        if not isinstance(coco.get(key), list):
            raise CocoFormatError(f"{path}: expected a list under '{key}'")
    coco.setdefault("annotations", [])
    image_ids = set()
    for image in coco["images"]:
        missing = {"id", "file_name", "height", "width"} - set(image)
        if missing:
            raise CocoFormatError(f"{path}: image {image.get('id')} lacks {sorted(missing)}")
        image_ids.add(image["id"])
    category_ids = {c["id"] for c in coco["categories"]}
    for ann in coco["annotations"]:
        where = f"{path}: annotation id {ann.get('id')}"
        if ann.get("image_id") not in image_ids:
            raise CocoFormatError(f"{where} refers to unknown image_id {ann.get('image_id')}")
        if ann.get("category_id") not in category_ids:
            raise CocoFormatError(f"{where} has unknown category_id {ann.get('category_id')}")
        bbox = ann.get("bbox")
        if (
            not isinstance(bbox, list)
            or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)
        ):
            raise CocoFormatError(f"{where} has a malformed bbox {bbox!r}")
    return coco


def _read_image(path: Path, counts) -> tuple[bytes, str, int, int]:
    """Image bytes stored as 3-channel JPEG or PNG; other modes and formats are re-encoded."""
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            fmt, mode, size = image.format, image.mode, image.size
            if fmt in ("JPEG", "PNG") and mode == "RGB":
                return data, fmt.lower(), size[1], size[0]
            out = io.BytesIO()
            if image.mode in ("RGBA", "LA", "P"):  # composite transparency onto white
                rgba = image.convert("RGBA")
                rgb = Image.new("RGB", rgba.size, (255, 255, 255))
                rgb.paste(rgba, mask=rgba.split()[3])
            else:
                rgb = image.convert("RGB")
            target = "jpeg" if fmt == "JPEG" else "png"
            rgb.save(out, format=target.upper(), quality=95)
    except OSError as e:
        raise CocoFormatError(f"image {path} cannot be decoded: {e}") from None
    counts[f"images converted from {fmt} {mode}"] += 1
    return out.getvalue(), target, size[1], size[0]


def _mask_png(segmentation, height: int, width: int) -> bytes | None:
    if isinstance(segmentation, list):  # polygons, possibly in several parts
        parts = [p for p in segmentation if len(p) >= 6 and len(p) % 2 == 0]
        if not parts:
            return None
        rle = mask_utils.merge(mask_utils.frPyObjects(parts, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        rle = segmentation
        if isinstance(rle["counts"], list):  # uncompressed RLE, as COCO's crowd regions
            rle = mask_utils.frPyObjects(rle, height, width)
    else:
        return None
    binary = mask_utils.decode(rle)
    out = io.BytesIO()
    Image.fromarray(binary.astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def build_example(image: dict, annotations: list, image_dir, names: dict, include_masks: bool):
    """(serialized tf.Example, counts of repairs and drops) for one image."""
    counts = collections.Counter()
    path = Path(image_dir) / image["file_name"]
    data, fmt, height, width = _read_image(path, counts)
    if (height, width) != (image["height"], image["width"]):
        raise CocoFormatError(
            f"image {path} is {height}x{width} but image id {image['id']} says "
            f"{image['height']}x{image['width']}"
        )
    obj = collections.defaultdict(list)
    for ann in annotations:
        x, y, w, h = ann["bbox"]
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
        if x1 <= x0 or y1 <= y0:
            counts["annotations dropped: zero width or height"] += 1
            continue
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            counts["boxes clipped to the image"] += 1
        if include_masks:
            png = _mask_png(ann.get("segmentation"), height, width)
            if png is None:
                counts["annotations dropped: no usable segmentation"] += 1
                continue
            obj["mask"].append(png)
        obj["xmin"].append(x0 / width)
        obj["xmax"].append(x1 / width)
        obj["ymin"].append(y0 / height)
        obj["ymax"].append(y1 / height)
        obj["label"].append(int(ann["category_id"]))
        obj["text"].append(names[ann["category_id"]].encode("utf8"))
        crowd = int(ann.get("iscrowd", 0))
        obj["is_crowd"].append(crowd)
        obj["area"].append(float(ann.get("area", (x1 - x0) * (y1 - y0))))
        counts["instances"] += 1
        counts["crowd instances"] += crowd
    features = {
        "image/encoded": data,
        "image/format": fmt.encode(),
        "image/height": height,
        "image/width": width,
        "image/filename": image["file_name"].encode("utf8"),
        "image/source_id": str(image["id"]).encode("utf8"),
        "image/key/sha256": hashlib.sha256(data).hexdigest().encode(),
        "image/object/bbox/xmin": obj["xmin"],
        "image/object/bbox/xmax": obj["xmax"],
        "image/object/bbox/ymin": obj["ymin"],
        "image/object/bbox/ymax": obj["ymax"],
        "image/object/class/label": obj["label"],
        "image/object/class/text": obj["text"],
        "image/object/is_crowd": obj["is_crowd"],
        "image/object/area": obj["area"],
    }
    if include_masks:
        features["image/object/mask"] = obj["mask"]
    empty = {  # typed empties so every record has every key
        "image/object/class/label": feature_pb2.Feature(int64_list=feature_pb2.Int64List()),
        "image/object/is_crowd": feature_pb2.Feature(int64_list=feature_pb2.Int64List()),
        "image/object/class/text": feature_pb2.Feature(bytes_list=feature_pb2.BytesList()),
        "image/object/mask": feature_pb2.Feature(bytes_list=feature_pb2.BytesList()),
    }
    example = example_pb2.Example(
        features=feature_pb2.Features(
            feature={
                k: (empty[k] if (k in empty and not v) else _feature(v))
                for k, v in features.items()
            }
        )
    )
    counts["images"] += 1
    return example.SerializeToString(), counts


def _build(args):
    return build_example(*args)


def shard_paths(output: str, num_shards: int) -> list[str]:
    return [f"{output}-{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)]


def label_map_path(output: str) -> str:
    return f"{output}.label_map.json"


def convert(
    image_dir,
    annotations,
    output: str,
    num_shards: int = 32,
    include_masks: bool = False,
    num_workers: int | None = None,
    verbose: bool = True,
) -> collections.Counter:
    """Converts one COCO split; returns counts of images, instances, repairs and drops."""
    import keras
    import tensorflow as tf

    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    coco = load_annotations(annotations)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    missing = [
        str(Path(image_dir) / im["file_name"])
        for im in coco["images"]
        if not (Path(image_dir) / im["file_name"]).is_file()
    ]
    if missing:
        raise CocoFormatError(
            f"{len(missing)} image file(s) listed in {annotations} are missing, first {missing[0]}"
        )
    per_image = collections.defaultdict(list)
    for ann in coco["annotations"]:
        per_image[ann["image_id"]].append(ann)
    jobs = [(im, per_image[im["id"]], image_dir, names, include_masks) for im in coco["images"]]

    paths = shard_paths(output, num_shards)
    Path(paths[0]).parent.mkdir(parents=True, exist_ok=True)
    num_workers = os.cpu_count() if num_workers is None else num_workers
    totals = collections.Counter()
    progress = keras.utils.Progbar(len(jobs), unit_name="image") if verbose else None
    # Fork, not spawn: workers use only PIL, numpy, pycocotools and protobuf.
    pool = multiprocessing.get_context("fork").Pool(num_workers) if num_workers > 1 else None
    writers = [tf.io.TFRecordWriter(p + ".tmp") for p in paths]
    try:
        results = pool.imap(_build, jobs, chunksize=8) if pool else map(_build, jobs)
        for i, (record, counts) in enumerate(results):
            writers[i % num_shards].write(record)
            totals.update(counts)
            if progress:
                progress.update(i + 1)
    except BaseException:
        for w, p in zip(writers, paths, strict=False):
            w.close()
            Path(p + ".tmp").unlink(missing_ok=True)
        raise
    finally:
        if pool:
            pool.terminate()
    for w, p in zip(writers, paths, strict=False):
        w.close()
        os.replace(p + ".tmp", p)
    Path(label_map_path(output)).write_text(json.dumps({str(k): v for k, v in names.items()}))
    return totals


def format_counts(counts: collections.Counter) -> str:
    head = [f"{counts['images']} images", f"{counts['instances']} instances"]
    head.append(f"{counts['crowd instances']} crowd")
    rest = [f"{k}: {v}" for k, v in sorted(counts.items()) if k not in ("images", "instances")]
    rest = [r for r in rest if not r.startswith("crowd instances")]
    return ", ".join(head) + "".join(f"\n  {r}" for r in rest)


def main(argv):
    del argv
    from absl import flags

    f = flags.FLAGS
    counts = convert(
        f.image_dir, f.annotations, f.output, f.num_shards, f.include_masks, f.num_workers
    )
    print(format_counts(counts))


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("image_dir", None, "Directory of the split's images.")
    flags.DEFINE_string("annotations", None, "COCO instances JSON of the split.")
    flags.DEFINE_string("output", None, "Output prefix: PREFIX-00000-of-00032.tfrecord, ...")
    flags.DEFINE_integer("num_shards", 32, "Number of output shards.")
    flags.DEFINE_boolean("include_masks", False, "Store instance masks as PNGs.")
    flags.DEFINE_integer("num_workers", None, "Worker processes (default: all cores).")
    for name in ("image_dir", "annotations", "output"):
        flags.mark_flag_as_required(name)
    app.run(main)
