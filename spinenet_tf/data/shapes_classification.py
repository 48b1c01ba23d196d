"""A synthetic shapes classification dataset: the embedded data of the classification quickstart.

One shape an image, its class the shape: shapes.py's four classes drawn as in the detection
data (textured background, random colour, aspect ratio and rotation), but large (about 0.35
to 0.8 of the shorter side) and whole. Images are written as ROOT/images/{split}/{class}/*.jpg,
the folder layout of create_classification_tfrecord. The same seed gives byte-identical output.

    python -m spinenet_tf.data.shapes_classification --output_dir=DIR --num_train=N \
        --num_val=M --image_size=S --seed=K
"""

from __future__ import annotations

import functools
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from spinenet_tf.data import create_classification_tfrecord, shapes

SPLITS = shapes.SPLITS
# Shape sizes as fractions of the image's shorter side, before the rotation and aspect ratio;
# shapes touching the border are redrawn, which leaves sides of about 0.35 to 0.8.
MIN_SIZE, MAX_SIZE = 0.3, 0.8
# Least L1 distance between the shape's colour and the mean background under it: lower than
# the detection data's 150, so that some shapes are faint.
MIN_CONTRAST = 100


def image_dir(root, split: str) -> Path:
    return Path(root) / "images" / split


def _draw_image(rng, category: int, h: int, w: int) -> Image.Image:
    """A shapes.py category drawn whole on a textured background."""
    image = shapes._background(rng, h, w)
    side = min(h, w)
    while True:
        mask = shapes._shape_mask(rng, category, h, w, MIN_SIZE * side, MAX_SIZE * side)
        if not (mask[[0, -1]].any() or mask[:, [0, -1]].any()):
            break
    pixels = np.asarray(image, np.float32)
    candidates = rng.uniform(0, 255, (64, 3))
    contrast = np.abs(candidates - pixels[mask].mean(axis=0)).sum(axis=1)
    colour = candidates[np.argmax(contrast >= MIN_CONTRAST)]
    # Light falling from one side, and some grain.
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w]
    ramp = ((xx - w / 2) * math.cos(angle) + (yy - h / 2) * math.sin(angle)) / side
    light = 1.0 + rng.uniform(0, 0.4) * ramp + rng.normal(0, 0.04, (h, w))
    painted = np.clip(colour * light[..., None], 0, 255)
    pixels = np.where(mask[..., None], painted, pixels)
    return Image.fromarray(pixels.astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))


def generate(
    output_dir,
    num_train: int = 1000,
    num_val: int = 200,
    image_size: int = 96,
    seed: int = 0,
) -> dict[str, Path]:
    """Writes `images/{split}/{class name}/{index:06d}.jpg` under output_dir, replacing what
    was there; classes take turns, so they are balanced.

    Images are between 0.75 * image_size and image_size on each side. Returns the image
    folder of each split.
    """
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    out = {}
    for k, (split, count) in enumerate(zip(SPLITS, (num_train, num_val), strict=True)):
        # One generator a split: the validation images do not depend on num_train.
        rng = np.random.default_rng([seed, k])
        folder = image_dir(output_dir, split)
        shutil.rmtree(folder, ignore_errors=True)  # the converter reads every file in it
        for c in shapes.CATEGORIES:
            (folder / c["name"]).mkdir(parents=True)
        for index in range(count):
            category = shapes.CATEGORIES[index % len(shapes.CATEGORIES)]
            h, w = (int(rng.integers(int(0.75 * image_size), image_size + 1)) for _ in "hw")
            buffer = io.BytesIO()
            _draw_image(rng, category["id"], h, w).save(buffer, format="JPEG", quality=92)
            (folder / category["name"] / f"{index:06d}.jpg").write_bytes(buffer.getvalue())
        out[split] = folder
    return out


def ensure_dataset(
    root,
    num_train: int = 1000,
    num_val: int = 200,
    image_size: int = 96,
    seed: int = 0,
    num_shards: int = 4,
) -> dict[str, str]:
    """Generates the dataset and its TFRecords under root unless they are already there.

    Returns {"train": pattern, "val": pattern, "label_map": the training label map,
    "images": pattern of the validation images}. Class ids are those of the sorted folder
    names (ellipse 1, rectangle 2, star 3, triangle 4); the validation split takes the
    training split's label map. A finished dataset is marked by root/records/DONE holding
    its arguments; other arguments regenerate it.
    """
    root = Path(root)
    records = root / "records"
    args = json.dumps([num_train, num_val, image_size, seed, num_shards])
    done = records / "DONE"
    out = {split: str(records / f"{split}-*.tfrecord") for split in SPLITS}
    out["label_map"] = create_classification_tfrecord.label_map_path(str(records / "train"))
    out["images"] = str(image_dir(root, "val") / "*" / "*.jpg")
    if done.exists() and done.read_text() == args:
        return out
    print(f"generating the synthetic shapes classification dataset in {root} ...", flush=True)
    # DONE goes with the old records, so that an interrupted run cannot pass for either.
    shutil.rmtree(records, ignore_errors=True)
    generate(root, num_train, num_val, image_size, seed)
    convert = functools.partial(
        create_classification_tfrecord.convert, num_shards=num_shards, verbose=False
    )
    convert(image_dir(root, "train"), str(records / "train"))
    convert(image_dir(root, "val"), str(records / "val"), label_map=out["label_map"])
    done.write_text(args)
    return out


def main(argv):
    del argv
    from absl import flags

    f = flags.FLAGS
    folders = generate(f.output_dir, f.num_train, f.num_val, f.image_size, f.seed)
    for split, folder in folders.items():
        count = sum(1 for _ in folder.glob("*/*.jpg"))
        print(f"{split}: {count} images in {len(shapes.CATEGORIES)} classes -> {folder}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("output_dir", None, "Where to write the images.")
    flags.DEFINE_integer("num_train", 1000, "Training images.")
    flags.DEFINE_integer("num_val", 200, "Held-out images.")
    flags.DEFINE_integer("image_size", 96, "Largest image side in pixels.")
    flags.DEFINE_integer("seed", 0, "Random seed; the same seed gives identical files.")
    flags.mark_flag_as_required("output_dir")
    app.run(main)
