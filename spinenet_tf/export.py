"""Exports a trained model (any task; a detector by default) as a SavedModel for TF Serving,
or a detector as a TFLite file for phones and edge devices.

    python -m spinenet_tf.export \
        --gin_file=gin_configs/experiments/quickstart.gin \
        --checkpoint=runs/quickstart --export_dir=exports/quickstart
    python -m spinenet_tf.export --format=tflite --quantization=int8 \
        --gin_file=... --checkpoint=... --export_dir=exports/tflite

SavedModel: one signature per input type (image_tensor, image_bytes, tf_example; the first
is also serving_default); see `spinenet_tf.serving.export.export_saved_model`. TFLite:
EXPORT_DIR/model_<quantization>.tflite and its contract EXPORT_DIR/model_<quantization>.json
(input size, normalisation, outputs, label map); see `spinenet_tf.serving.tflite`.
"""

from __future__ import annotations

import os
import sys

from spinenet_tf import console

console.quiet_tensorflow("export")

import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from spinenet_tf.serving import cli  # noqa: E402
from spinenet_tf.serving.export import INPUT_TYPES, export_saved_model  # noqa: E402
from spinenet_tf.serving.tflite import (  # noqa: E402
    IO_DTYPES,
    POSTPROCESSING,
    QUANTIZATIONS,
    export_tflite,
    postprocessing,
    sidecar_path,
)

JIT_SERVING_CAVEAT = (
    "Stock TF Serving runs XLA-compiled functions on CPU only when started with "
    "--xla_cpu_compilation_enabled, and some GPU builds fail on them "
    "(tensorflow/serving#2214)."
)

cli.define_model_flags()
flags.DEFINE_enum("format", "saved_model", ["saved_model", "tflite"], "What to export.")
flags.DEFINE_string(
    "export_dir",
    None,
    "Where to write the SavedModel, or the .tflite file and its JSON (local or gs://).",
)
flags.DEFINE_list("input_types", list(INPUT_TYPES), f"SavedModel signatures, from {INPUT_TYPES}.")
flags.DEFINE_float("score_threshold", None, "Detection tasks: override the decoding threshold.")
flags.DEFINE_integer("max_detections", None, "Detection tasks: override detections per image.")
flags.DEFINE_bool(
    "jit_compile",
    False,
    f"SavedModel: compile network and decoding with XLA. {JIT_SERVING_CAVEAT}",
)
flags.DEFINE_enum(
    "quantization",
    "none",
    QUANTIZATIONS,
    "TFLite: none (float32), fp16 (float16 weights), dynamic (int8 weights, float "
    "activations) or int8 (weights and activations, calibrated on --calibration_steps images "
    "of the experiment's training pipeline; post-processing stays float32).",
)
flags.DEFINE_integer(
    "calibration_steps", 100, "TFLite int8: training images (batches of 1) to calibrate on."
)
flags.DEFINE_enum(
    "tflite_postprocess",
    "custom_op",
    POSTPROCESSING,
    "TFLite detections: custom_op (TFLite_Detection_PostProcess), builtin (the same "
    "NMS from builtin ops) or raw (per-level class logits and box deltas).",
)
flags.DEFINE_enum(
    "tflite_nms",
    "class_agnostic",
    ["class_agnostic", "per_class"],
    "TFLite detections' NMS: class_agnostic (one NMS over each anchor's best class; fast) "
    "or per_class (within each class, as the Keras model decodes; with builtin, the Keras "
    "model's own decoding; slower with many classes).",
)
flags.DEFINE_enum(
    "int8_io",
    "float32",
    IO_DTYPES,
    "TFLite int8: the input's type; uint8 is the quantised normalised image (scale and zero "
    "point in the JSON), and raw outputs become uint8 too.",
)
flags.mark_flags_as_required(["checkpoint", "export_dir"])
FLAGS = flags.FLAGS

_TFLITE_ONLY = ("quantization", "calibration_steps", "tflite_postprocess", "tflite_nms", "int8_io")


def check_flags(flag_values) -> None:
    """Usage errors for flags that do not go together, naming them."""
    if flag_values.format == "saved_model":
        given = [f"--{name}" for name in _TFLITE_ONLY if flag_values[name].present]
        if given:
            raise app.UsageError(f"{', '.join(given)} apply to --format=tflite only")
        unknown = sorted(set(flag_values.input_types) - set(INPUT_TYPES))
        if unknown:
            raise app.UsageError(f"unknown --input_types {unknown}; expected some of {INPUT_TYPES}")
        return
    for name in ("jit_compile", "input_types"):
        if flag_values[name].present:
            raise app.UsageError(f"--{name} applies to --format=saved_model only")
    if flag_values["tflite_nms"].present and flag_values.tflite_postprocess == "raw":
        raise app.UsageError(
            "--tflite_nms applies to --tflite_postprocess=custom_op or builtin; raw exports "
            "have no NMS (TFLiteDetector decodes them as the Keras model does)"
        )
    int8 = flag_values.quantization == "int8"
    if flag_values.int8_io != "float32" and not int8:
        raise app.UsageError(
            f"--int8_io={flag_values.int8_io} needs --quantization=int8, "
            f"got --quantization={flag_values.quantization}"
        )
    if flag_values["calibration_steps"].present and not int8:
        raise app.UsageError("--calibration_steps applies to --quantization=int8 only")
    if flag_values.calibration_steps < 1:
        raise app.UsageError(
            f"--calibration_steps must be >= 1, got {flag_values.calibration_steps}"
        )


def tflite_path(export_dir: str, quantization: str, io_dtype: str) -> str:
    name = "float32" if quantization == "none" else quantization
    if io_dtype != "float32":
        name += f"_{io_dtype}_io"
    return os.path.join(export_dir, f"model_{name}.tflite")


def export_tflite_from_flags(task, model, label_map) -> str:
    from spinenet_tf.serving import load
    from spinenet_tf.tasks.retinanet import RetinaNetTask
    from spinenet_tf.training import gin_bindings

    if type(task) is not RetinaNetTask:  # not its subclasses (Mask R-CNN)
        raise app.UsageError(
            "--format=tflite exports RetinaNet detectors (RetinaNetTask); this experiment's "
            f"task is {type(task).__name__}"
        )
    images = None
    if FLAGS.quantization == "int8":
        config = gin_bindings.experiment_config()
        try:
            images = load.calibration_images(config, task, model, FLAGS.calibration_steps)
        except ValueError as e:
            raise app.UsageError(str(e)) from None
    path = tflite_path(FLAGS.export_dir, FLAGS.quantization, FLAGS.int8_io)
    return export_tflite(
        model,
        path,
        quantization=FLAGS.quantization,
        postprocess=postprocessing(
            model, FLAGS.tflite_postprocess, class_agnostic=FLAGS.tflite_nms == "class_agnostic"
        ),
        representative_dataset=images,
        io_dtype=FLAGS.int8_io,
        label_map=label_map,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    absl_logging.set_verbosity(absl_logging.WARNING)
    check_flags(FLAGS)
    overrides = {
        k: getattr(FLAGS, k)
        for k in ("score_threshold", "max_detections")
        if getattr(FLAGS, k) is not None
    }
    task, model, label_map = cli.load_from_flags(FLAGS, overrides)
    height, width = model.input_shape[1:3]
    if FLAGS.format == "tflite":
        path = export_tflite_from_flags(task, model, label_map)
        post = FLAGS.tflite_postprocess
        if post != "raw":
            post += f", {FLAGS.tflite_nms} NMS"
        print(
            f"exported {model.name} ({height}x{width} input, {len(label_map)} labels, "
            f"{FLAGS.quantization}, {post}) to {path} "
            f"({tf.io.gfile.stat(path).length / 1e6:.2f} MB), its contract in the file and "
            f"in {sidecar_path(path)}",
            file=sys.stdout,
            flush=True,
        )
        return
    if FLAGS.jit_compile:
        print(f"warning: --jit_compile: {JIT_SERVING_CAVEAT}", file=sys.stderr, flush=True)
    export_saved_model(
        model,
        FLAGS.export_dir,
        input_types=FLAGS.input_types,
        label_map=label_map,
        jit_compile=FLAGS.jit_compile,
        task=task,
    )
    print(
        f"exported {model.name} ({height}x{width} input, "
        f"{len(label_map)} labels) to {FLAGS.export_dir}: signatures "
        f"{', '.join(FLAGS.input_types)} (serving_default = {FLAGS.input_types[0]})",
        file=sys.stdout,
        flush=True,
    )


if __name__ == "__main__":
    app.run(main)
