"""Input pipeline throughput: ours against Model Garden's RetinaNet parser, in one run.

    python benchmarks/input_pipeline.py [--image_size=640] [--threads=2] [--batches=30]

Writes synthetic shapes images (up to image_size on a side) as TFRecords, then times
training-mode pipelines on the same records with the same private thread pool: decode,
random flip, scale jitter 0.5-2.0 with crop, pad to image_size, 100 padded instances and
RetinaNet targets for levels 3-7 with 9 anchors per location, batched 8. Model Garden's is
TfExampleDecoder + retinanet_input.Parser (float32 output). Prints images per second and the
ratio ours / Model Garden's (above 1: ours is faster). Needs the `modelgarden` extra.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402

from spinenet_tf import build_retinanet  # noqa: E402
from spinenet_tf.data import create_coco_tfrecord, shapes  # noqa: E402
from spinenet_tf.data.dataset import make_dataset  # noqa: E402
from spinenet_tf.data.parsers import detection_parser  # noqa: E402

BATCH = 8


def _records(root: str, image_size: int, num_images: int) -> str:
    shapes.generate(root, num_train=num_images, num_val=0, image_size=image_size, seed=0)
    prefix = os.path.join(root, "train")
    create_coco_tfrecord.convert(
        shapes.image_dir(root, "train"),
        shapes.annotation_path(root, "train"),
        prefix,
        num_shards=4,
        verbose=False,
    )
    return prefix + "-*.tfrecord"


def _with_threads(ds: tf.data.Dataset, threads: int) -> tf.data.Dataset:
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    return ds.with_options(options)


def ours(pattern: str, image_size: int, threads: int) -> tf.data.Dataset:
    model = build_retinanet("49S", 91, image_size)
    parser = detection_parser(
        image_size, training=True, scale_range=(0.5, 2.0), targets_fn=model.labeler.matches
    )
    ds = make_dataset(pattern, parser, BATCH, training=True, shuffle_buffer=64)
    return _with_threads(ds, threads)


def model_garden(pattern: str, image_size: int, threads: int) -> tf.data.Dataset:
    from official.vision.dataloaders import retinanet_input, tf_example_decoder

    decoder = tf_example_decoder.TfExampleDecoder()
    parser = retinanet_input.Parser(
        output_size=[image_size, image_size],
        min_level=3,
        max_level=7,
        num_scales=3,
        aspect_ratios=[0.5, 1.0, 2.0],
        anchor_size=3,
        match_threshold=0.5,
        unmatched_threshold=0.4,
        aug_rand_hflip=True,
        aug_scale_min=0.5,
        aug_scale_max=2.0,
        max_num_instances=100,
        dtype="float32",
    )
    parse = parser.parse_fn(is_training=True)
    files = tf.data.Dataset.list_files(pattern, shuffle=True)
    ds = files.interleave(
        tf.data.TFRecordDataset, cycle_length=4, num_parallel_calls=tf.data.AUTOTUNE
    )
    ds = ds.repeat().shuffle(64)
    ds = ds.map(lambda r: parse(decoder.decode(r)), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(BATCH, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return _with_threads(ds, threads)


def images_per_second(ds: tf.data.Dataset, batches: int) -> float:
    it = iter(ds)
    for _ in range(5):  # fill buffers, let AUTOTUNE settle
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * BATCH / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image_size", type=int, default=640)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--num_images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        pattern = _records(root, args.image_size, args.num_images)
        pipelines = {
            "model_garden": model_garden(pattern, args.image_size, args.threads),
            "ours": ours(pattern, args.image_size, args.threads),
        }
        best = dict.fromkeys(pipelines, 0.0)
        for _ in range(args.rounds):  # alternate, so drift in machine load hits both
            for name, ds in pipelines.items():
                best[name] = max(best[name], images_per_second(ds, args.batches))
    print(f"{args.image_size} px, batch {BATCH}, {args.threads} threads, best of {args.rounds}:")
    for name, value in best.items():
        print(f"  {name:13s} {value:7.1f} images/s")
    print(f"  ours / model_garden: {best['ours'] / best['model_garden']:.2f}x")


if __name__ == "__main__":
    main()
