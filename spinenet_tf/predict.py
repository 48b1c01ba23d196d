"""Runs a detector over image files: annotated images and COCO-format results.

    python -m spinenet_tf.predict --saved_model=exports/quickstart \
        --images='data/shapes/val/*.jpg' --output_dir=runs/predictions
    python -m spinenet_tf.predict --gin_file=gin_configs/experiments/quickstart.gin \
        --checkpoint=runs/quickstart --images='photos/*.png' --output_dir=out

Writes OUTPUT_DIR/<name>.png (each image with its detections drawn) and
OUTPUT_DIR/detections.json (COCO results: image_id, category_id, bbox [x, y, w, h], score,
plus file_name and category_name). Image ids come from --annotations (a COCO file listing the
images) when given, else from numeric file names (COCO's 000000397133.jpg -> 397133; other
names are numbered on from the largest), or, when numeric names repeat, from the image's
position. Files that cannot be decoded are reported by name and skipped.
"""

from __future__ import annotations

import json
import os
import sys

import tensorflow as tf
from absl import app, flags
from absl import logging as absl_logging

from spinenet_tf.serving import cli
from spinenet_tf.serving.label_map import read_label_map
from spinenet_tf.serving.visualize import draw_detections

flags.DEFINE_string("saved_model", None, "A SavedModel from spinenet_tf.export.")
cli.define_model_flags()
flags.DEFINE_list("images", None, "Image files: glob patterns (local or gs://), comma-separated.")
flags.DEFINE_string("output_dir", None, "Where to write annotated images and detections.json.")
flags.DEFINE_float("score_threshold", 0.3, "Detections below this score are left out.")
flags.DEFINE_string("annotations", None, "COCO annotation file whose images give the ids.")
flags.DEFINE_integer("batch_size", 8, "Images per call of the model.")
flags.mark_flags_as_required(["images", "output_dir"])
FLAGS = flags.FLAGS


def saved_model_runner(path: str):
    """(run(encoded [B]) -> outputs, label map) for an exported SavedModel."""
    loaded = tf.saved_model.load(path)
    if "image_bytes" in loaded.signatures:
        signature = loaded.signatures["image_bytes"]

        def run(encoded):
            return signature(inputs=tf.constant(encoded))
    elif "image_tensor" in loaded.signatures:
        signature = loaded.signatures["image_tensor"]

        def run(encoded):  # images of one call must share a size here: one at a time
            outs = [
                signature(inputs=tf.io.decode_image(e, channels=3, expand_animations=False)[None])
                for e in encoded
            ]
            return {k: tf.concat([o[k] for o in outs], 0) for k in outs[0]}
    else:
        raise app.UsageError(
            f"{path} has neither an image_bytes nor an image_tensor signature "
            f"(it has {sorted(loaded.signatures)})"
        )
    labels = os.path.join(path, "assets.extra", "label_map.json")
    return run, read_label_map(labels) if tf.io.gfile.exists(labels) else {}


def checkpoint_runner(flag_values):
    """(run, label map) for a gin experiment and training checkpoint, computing what an
    export of it would serve."""
    from spinenet_tf.serving.export import Detector

    model, label_map = cli.load_from_flags(flag_values)
    detector = Detector(model, label_map)
    fn = tf.function(detector.from_image_bytes, input_signature=[tf.TensorSpec([None], tf.string)])
    return (lambda encoded: fn(tf.constant(encoded))), label_map


def image_ids(files: list[str], annotations: str | None) -> list[int]:
    if annotations:
        with tf.io.gfile.GFile(annotations) as f:
            by_name = {os.path.basename(im["file_name"]): im["id"] for im in json.load(f)["images"]}
        missing = [p for p in files if os.path.basename(p) not in by_name]
        if missing:
            raise app.UsageError(
                f"{len(missing)} images are not in --annotations={annotations}, e.g. {missing[0]}"
            )
        return [int(by_name[os.path.basename(p)]) for p in files]
    stems = [os.path.splitext(os.path.basename(p))[0] for p in files]
    numeric = [int(s) for s in stems if s.isdigit()]
    if len(set(numeric)) == len(numeric):
        # Other names are numbered on from the largest numeric one, so ids stay unique.
        extra = iter(range(max(numeric, default=0) + 1, sys.maxsize))
        return [int(s) if s.isdigit() else next(extra) for s in stems]
    return list(range(1, len(files) + 1))


def read_images(files: list[str]):
    """Yields (index, path, encoded bytes, pixels) for each decodable file; reports the rest."""
    for i, path in enumerate(files):
        try:
            with tf.io.gfile.GFile(path, "rb") as f:
                data = f.read()
            pixels = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
        except (tf.errors.OpError, OSError) as e:
            message = getattr(e, "message", None) or str(e)
            print(f"skipped {path}: cannot read it as an image ({message})", file=sys.stderr)
            continue
        yield i, path, data, pixels


def predict(run, label_map, files, output_dir, score_threshold, ids, batch_size=8) -> dict:
    """Runs `run` over the files; writes the images and detections.json; returns counts."""
    tf.io.gfile.makedirs(output_dir)
    results, used_names, done = [], set(), 0
    pending = []

    def flush():
        nonlocal done
        if not pending:
            return
        outputs = {k: v.numpy() for k, v in run([p[2] for p in pending]).items()}
        for row, (i, path, _, pixels) in enumerate(pending):
            n = int(outputs["num_detections"][row])
            det = {
                "boxes": outputs["detection_boxes"][row][:n],
                "scores": outputs["detection_scores"][row][:n],
                "classes": outputs["detection_classes"][row][:n],
            }
            stem = os.path.splitext(os.path.basename(path))[0]
            name, k = stem, 1
            while name in used_names:  # same file name in two directories
                k += 1
                name = f"{stem}_{k}"
            used_names.add(name)
            with tf.io.gfile.GFile(os.path.join(output_dir, name + ".png"), "wb") as f:
                draw_detections(pixels, det, label_map, score_threshold).save(f, format="PNG")
            for box, score, cls in zip(det["boxes"], det["scores"], det["classes"], strict=True):
                if score < score_threshold:
                    continue
                ymin, xmin, ymax, xmax = (float(v) for v in box)
                results.append(
                    {
                        "image_id": ids[i],
                        "file_name": path,
                        "category_id": int(cls),
                        "category_name": label_map.get(int(cls), str(int(cls))),
                        "bbox": [xmin, ymin, xmax - xmin, ymax - ymin],
                        "score": float(score),
                    }
                )
            done += 1
        pending.clear()

    for item in read_images(files):
        pending.append(item)
        if len(pending) == batch_size:
            flush()
    flush()
    with tf.io.gfile.GFile(os.path.join(output_dir, "detections.json"), "w") as f:
        json.dump(results, f)
    return {"images": done, "skipped": len(files) - done, "detections": len(results)}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    absl_logging.set_verbosity(absl_logging.WARNING)
    if bool(FLAGS.saved_model) == bool(FLAGS.checkpoint):
        raise app.UsageError("give either --saved_model or --gin_file with --checkpoint")
    files = sorted({p for pattern in FLAGS.images for p in tf.io.gfile.glob(pattern)})
    if not files:
        raise app.UsageError(f"no files match --images={','.join(FLAGS.images)}")
    ids = image_ids(files, FLAGS.annotations)
    if FLAGS.saved_model:
        run, label_map = saved_model_runner(FLAGS.saved_model)
    else:
        run, label_map = checkpoint_runner(FLAGS)
    counts = predict(
        run, label_map, files, FLAGS.output_dir, FLAGS.score_threshold, ids, FLAGS.batch_size
    )
    print(
        f"{counts['images']} images, {counts['detections']} detections with score >= "
        f"{FLAGS.score_threshold} -> {FLAGS.output_dir}; {counts['skipped']} unreadable "
        "files skipped",
        flush=True,
    )
    if counts["images"] == 0:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
