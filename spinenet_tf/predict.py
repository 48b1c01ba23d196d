"""Runs a trained model over image files: images drawn by its task and JSON results (a
detector's: COCO-format detections).

    python -m spinenet_tf.predict --saved_model=exports/quickstart \
        --images='data/shapes/val/*.jpg' --output_dir=runs/predictions
    python -m spinenet_tf.predict --gin_file=gin_configs/experiments/quickstart.gin \
        --checkpoint=runs/quickstart --images='photos/*.png' --output_dir=out
    python -m spinenet_tf.predict --tflite=exports/tflite/model_int8.tflite \
        --images='data/shapes/val/*.jpg' --output_dir=runs/predictions_tflite

Writes OUTPUT_DIR/<name>.png (each image as the task draws its prediction: detections for
RetinaNet) and OUTPUT_DIR/detections.json (the task's records; RetinaNet: COCO results,
category_id, bbox [x, y, w, h], score, category_name; each with image_id and file_name). A
SavedModel is read as the task its export recorded (RetinaNet, classification: top classes
drawn beneath the image, records of category_id, category_name, score); give --gin_file
too for a task of one's own. A TFLite file (detectors) is read with the contract its export
wrote into it (else the JSON beside it), each image fitted to the file's static input
size. Image ids come from --annotations (a COCO file listing the images) when given, else
from numeric file names (COCO's 000000397133.jpg -> 397133; other names are numbered on
from the largest), or, when numeric names repeat, from the image's position. Files that
cannot be decoded are reported by name and skipped.
"""

from __future__ import annotations

import json
import os
import sys

from spinenet_tf import console

console.quiet_tensorflow("predict")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from spinenet_tf.data.label_map import read_label_map  # noqa: E402
from spinenet_tf.serving import cli  # noqa: E402
from spinenet_tf.tasks.classification import ClassificationTask  # noqa: E402
from spinenet_tf.tasks.maskrcnn import MaskRCNNTask  # noqa: E402
from spinenet_tf.tasks.retinanet import RetinaNetTask  # noqa: E402
from spinenet_tf.training import gin_bindings  # noqa: E402

flags.DEFINE_string("saved_model", None, "A SavedModel from spinenet_tf.export.")
flags.DEFINE_string(
    "tflite",
    None,
    "A .tflite file from spinenet_tf.export --format=tflite (its contract inside, or its .json "
    "beside).",
)
flags.DEFINE_integer("num_threads", None, "--tflite: interpreter threads (default: its own).")
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


def tflite_runner(path: str, num_threads: int | None = None):
    """(run(encoded [B]) -> outputs, label map) for an exported TFLite detector: one image
    at a time (batch 1, static size), each fitted to the file's input size."""
    from spinenet_tf.serving.tflite import TFLiteDetector

    try:
        detector = TFLiteDetector(path, num_threads=num_threads)
    except (ValueError, OSError) as e:
        raise app.UsageError(str(e)) from None

    def run(encoded):
        outs = [
            detector.detect(tf.io.decode_image(e, channels=3, expand_animations=False))
            for e in encoded
        ]
        return {k: tf.constant(np.concatenate([o[k] for o in outs])) for k in outs[0]}

    return run, detector.label_map


def checkpoint_runner(flag_values):
    """(run, label map, task) for a gin experiment and training checkpoint, computing what
    an export of it would serve."""
    task, model, label_map = cli.load_from_flags(flag_values)
    module = task.serving_module(model, label_map)
    fn = tf.function(module.from_image_bytes, input_signature=[tf.TensorSpec([None], tf.string)])
    return (lambda encoded: fn(tf.constant(encoded))), label_map, task


BUILT_IN_TASKS = {
    "RetinaNetTask": RetinaNetTask,
    "ClassificationTask": ClassificationTask,
    "MaskRCNNTask": MaskRCNNTask,
}


def saved_model_task(flag_values, path: str):
    """The task a SavedModel's outputs are read with: the gin experiment's, else the one
    its export recorded (a built-in task), else RetinaNet."""
    if not flag_values.gin_file:
        recorded = os.path.join(path, "assets.extra", "task.json")
        if tf.io.gfile.exists(recorded):
            with tf.io.gfile.GFile(recorded) as f:
                name = json.load(f).get("task")
            if name not in BUILT_IN_TASKS:
                raise app.UsageError(
                    f"{path} was exported by task {name!r}: give its experiment's --gin_file"
                )
            return BUILT_IN_TASKS[name]()
        return RetinaNetTask()
    try:
        gin_bindings.parse(flag_values.gin_file, flag_values.gin_param)
        return gin_bindings.experiment_config().task
    except (OSError, TypeError, ValueError) as e:
        raise app.UsageError(str(e)) from None


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


def predict(
    run, label_map, files, output_dir, score_threshold, ids, batch_size=8, task=None
) -> dict:
    """Runs `run` over the files; writes the images the task draws and detections.json (its
    records); returns counts. `task` defaults to RetinaNetTask."""
    task = task if task is not None else RetinaNetTask()
    tf.io.gfile.makedirs(output_dir)
    results, used_names, done = [], set(), 0
    pending = []

    def flush():
        nonlocal done
        if not pending:
            return
        outputs = {k: v.numpy() for k, v in run([p[2] for p in pending]).items()}
        for row, (i, path, _, pixels) in enumerate(pending):
            prediction = {k: v[row] for k, v in outputs.items()}
            stem = os.path.splitext(os.path.basename(path))[0]
            name, k = stem, 1
            while name in used_names:  # same file name in two directories
                k += 1
                name = f"{stem}_{k}"
            used_names.add(name)
            with tf.io.gfile.GFile(os.path.join(output_dir, name + ".png"), "wb") as f:
                drawn = task.draw_prediction(pixels, prediction, label_map, score_threshold)
                drawn.save(f, format="PNG")
            records = task.prediction_records(
                prediction, label_map, score_threshold, image_hw=pixels.shape[:2]
            )
            for record in records:
                results.append({"image_id": ids[i], "file_name": path, **record})
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
    if sum(bool(x) for x in (FLAGS.saved_model, FLAGS.tflite, FLAGS.checkpoint)) != 1:
        raise app.UsageError("give one of --saved_model, --tflite, or --gin_file with --checkpoint")
    files = sorted({p for pattern in FLAGS.images for p in tf.io.gfile.glob(pattern)})
    if not files:
        raise app.UsageError(f"no files match --images={','.join(FLAGS.images)}")
    ids = image_ids(files, FLAGS.annotations)
    if FLAGS.saved_model:
        run, label_map = saved_model_runner(FLAGS.saved_model)
        task = saved_model_task(FLAGS, FLAGS.saved_model)
    elif FLAGS.tflite:
        run, label_map = tflite_runner(FLAGS.tflite, FLAGS.num_threads)
        task = RetinaNetTask()
    else:
        run, label_map, task = checkpoint_runner(FLAGS)
    counts = predict(
        run, label_map, files, FLAGS.output_dir, FLAGS.score_threshold, ids, FLAGS.batch_size, task
    )
    print(
        f"{counts['images']} images, {counts['detections']} results with score >= "
        f"{FLAGS.score_threshold} -> {FLAGS.output_dir}; {counts['skipped']} unreadable "
        "files skipped",
        flush=True,
    )
    if counts["images"] == 0:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
