"""A synthetic shapes detection dataset in COCO format: the project's embedded default data.

Four shape classes in varied sizes, colours, aspect ratios and rotations, partly occluding
each other on textured backgrounds. Boxes, areas and RLE masks are those of the visible part
of each shape, as in COCO. The same seed gives byte-identical output.

    python -m spinenet_tf.data.shapes --output_dir=DIR --num_train=N --num_val=M \
        --image_size=S --seed=K
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from pycocotools import mask as mask_utils

from spinenet_tf.data import create_coco_tfrecord

CATEGORIES = (
    {"id": 1, "name": "ellipse", "supercategory": "shape"},
    {"id": 2, "name": "rectangle", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
    {"id": 4, "name": "star", "supercategory": "shape"},
)
SPLITS = ("train", "val")
# A shape keeps at least this fraction of its pixels visible; otherwise it is not placed.
MIN_VISIBLE = 0.6


def annotation_path(root, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{split}.json"


def image_dir(root, split: str) -> Path:
    return Path(root) / split


def _background(rng, h, w) -> Image.Image:
    """Low-frequency colour noise plus an optional stripe pattern and pixel noise."""
    grid = rng.uniform(0, 255, (rng.integers(2, 6), rng.integers(2, 6), 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), np.float32)
    image = 0.5 * image + 0.5 * rng.uniform(40, 215, 3)
    if rng.random() < 0.5:
        period = rng.uniform(6, 24)
        angle = rng.uniform(0, math.pi)
        yy, xx = np.mgrid[0:h, 0:w]
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period
        image += rng.uniform(10, 35) * np.sin(phase)[..., None]
    image += rng.normal(0, 6, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def _polygon(category: int, cx, cy, sy, sx, angle) -> list[tuple[float, float]]:
    if category == 2:
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif category == 3:
        corners = [(0, -1), (1, 1), (-1, 1)]
    else:  # five-pointed star
        corners = [
            (r * math.sin(k * math.pi / 5), -r * math.cos(k * math.pi / 5))
            for k, r in zip(range(10), [1.0, 0.45] * 5, strict=False)
        ]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + c * x * sx - s * y * sy, cy + s * x * sx + c * y * sy) for x, y in corners]


def _shape_mask(rng, category: int, h, w, min_size, max_size) -> np.ndarray:
    size = rng.uniform(min_size, max_size)
    aspect = math.exp(rng.uniform(-math.log(2), math.log(2)))
    sy, sx = size * math.sqrt(aspect) / 2, size / math.sqrt(aspect) / 2
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    if category == 1:
        draw.ellipse([cx - sx, cy - sy, cx + sx, cy + sy], fill=1)
    else:
        angle = rng.uniform(-math.pi / 6, math.pi / 6)
        draw.polygon(_polygon(category, cx, cy, sy, sx, angle), fill=1)
    return np.asarray(canvas, bool)


def _draw_image(rng, h, w, max_objects, min_size, max_size):
    """Returns (PIL image, [(category_id, visible mask)])."""
    image = _background(rng, h, w)
    pixels = np.asarray(image, np.float32)
    placed: list[tuple[int, np.ndarray]] = []
    # A few images without shapes: they count in COCO evaluation as pure false-positive tests.
    wanted = 0 if rng.random() < 0.03 else int(rng.integers(1, max_objects + 1))
    for _ in range(6 * wanted):
        if len(placed) == wanted:
            break
        category = int(rng.integers(1, len(CATEGORIES) + 1))
        mask = _shape_mask(rng, category, h, w, min_size, max_size)
        area = mask.sum()
        if area < 0.25 * min_size**2:  # mostly outside the image
            continue
        if any(((m & ~mask).sum() < MIN_VISIBLE * m.sum()) for _, m in placed):
            continue
        background = pixels[mask].mean(axis=0)
        colour = rng.uniform(0, 255, 3)
        while np.abs(colour - background).sum() < 150:
            colour = rng.uniform(0, 255, 3)
        shade = 1.0 + rng.normal(0, 0.04, (h, w, 1))
        pixels = np.where(mask[..., None], np.clip(colour * shade, 0, 255), pixels)
        placed = [(c, m & ~mask) for c, m in placed] + [(category, mask)]
    image = Image.fromarray(pixels.astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))
    return image, placed


def _annotation(ann_id, image_id, category, mask) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    x, y, bw, bh = mask_utils.toBbox(rle).tolist()
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category,
        "bbox": [x, y, bw, bh],
        "area": float(mask_utils.area(rle)),
        "iscrowd": 0,
        "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
    }


def generate(
    output_dir,
    num_train: int = 800,
    num_val: int = 100,
    image_size: int = 128,
    seed: int = 0,
    max_objects: int = 4,
) -> dict[str, Path]:
    """Writes `{split}/*.jpg` and `annotations/instances_{split}.json` under output_dir.

    Images are between 0.75 * image_size and image_size on each side; shapes between
    image_size / 8 and image_size / 2.5. Returns the annotation file of each split.
    """
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    rng = np.random.default_rng(seed)
    out = {}
    ann_id = 1
    image_id = 1
    for split, count in zip(SPLITS, (num_train, num_val), strict=False):
        images, annotations = [], []
        image_dir(output_dir, split).mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            h, w = (int(rng.integers(int(0.75 * image_size), image_size + 1)) for _ in "hw")
            image, placed = _draw_image(rng, h, w, max_objects, image_size / 8, image_size / 2.5)
            file_name = f"{image_id:06d}.jpg"
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=92)
            (image_dir(output_dir, split) / file_name).write_bytes(buffer.getvalue())
            images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
            for category, mask in placed:
                annotations.append(_annotation(ann_id, image_id, category, mask))
                ann_id += 1
            image_id += 1
        path = annotation_path(output_dir, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        coco = {
            "info": {"description": f"spinenet_tf synthetic shapes, seed {seed}"},
            "images": images,
            "annotations": annotations,
            "categories": list(CATEGORIES),
        }
        path.write_text(json.dumps(coco))
        out[split] = path
    return out


def ensure_dataset(
    root,
    num_train: int = 800,
    num_val: int = 100,
    image_size: int = 128,
    seed: int = 0,
    num_shards: int = 4,
) -> dict[str, str]:
    """Generates the dataset and its TFRecords under root unless they are already there.

    Returns {"train": pattern, "val": pattern, "val_annotations": path}. A finished dataset
    is marked by root/records/DONE holding its arguments; other arguments regenerate it.
    """
    root = Path(root)
    records = root / "records"
    # "masks": the records hold instance masks (for Mask R-CNN; detection ignores them), so
    # a dataset generated before they did is regenerated.
    args = json.dumps([num_train, num_val, image_size, seed, num_shards, "masks"])
    done = records / "DONE"
    out = {split: str(records / f"{split}-*.tfrecord") for split in SPLITS}
    out["val_annotations"] = str(annotation_path(root, "val"))
    if done.exists() and done.read_text() == args:
        return out
    print(f"generating the synthetic shapes dataset in {root} ...", flush=True)
    generate(root, num_train, num_val, image_size, seed)
    for split in SPLITS:
        for old in records.glob(f"{split}-*"):
            old.unlink()
        create_coco_tfrecord.convert(
            image_dir(root, split),
            annotation_path(root, split),
            str(records / split),
            num_shards=num_shards,
            include_masks=True,
            verbose=False,
        )
    done.write_text(args)
    return out


def main(argv):
    del argv
    from absl import flags

    f = flags.FLAGS
    paths = generate(f.output_dir, f.num_train, f.num_val, f.image_size, f.seed, f.max_objects)
    for split, path in paths.items():
        coco = json.loads(path.read_text())
        print(f"{split}: {len(coco['images'])} images, {len(coco['annotations'])} shapes -> {path}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("output_dir", None, "Where to write images and annotations.")
    flags.DEFINE_integer("num_train", 800, "Training images.")
    flags.DEFINE_integer("num_val", 100, "Held-out images.")
    flags.DEFINE_integer("image_size", 128, "Largest image side in pixels.")
    flags.DEFINE_integer("seed", 0, "Random seed; the same seed gives identical files.")
    flags.DEFINE_integer("max_objects", 4, "Most shapes per image.")
    flags.mark_flag_as_required("output_dir")
    app.run(main)
