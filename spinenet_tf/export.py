"""Exports a trained model (any task; a detector by default) as a SavedModel for TF Serving.

    python -m spinenet_tf.export \
        --gin_file=gin_configs/experiments/quickstart.gin \
        --checkpoint=runs/quickstart --export_dir=exports/quickstart

One signature per input type (image_tensor, image_bytes, tf_example; the first is also
serving_default); see `spinenet_tf.serving.export.export_saved_model`.
"""

from __future__ import annotations

import sys

from spinenet_tf import console

console.quiet_tensorflow("export")

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from spinenet_tf.serving import cli  # noqa: E402
from spinenet_tf.serving.export import INPUT_TYPES, export_saved_model  # noqa: E402

cli.define_model_flags()
flags.DEFINE_string("export_dir", None, "Where to write the SavedModel (local or gs://).")
flags.DEFINE_list("input_types", list(INPUT_TYPES), f"Signatures, from {INPUT_TYPES}.")
flags.DEFINE_float("score_threshold", None, "Detection tasks: override the decoding threshold.")
flags.DEFINE_integer("max_detections", None, "Detection tasks: override detections per image.")
flags.DEFINE_bool("jit_compile", False, "Compile network and decoding with XLA.")
flags.mark_flags_as_required(["checkpoint", "export_dir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    absl_logging.set_verbosity(absl_logging.WARNING)
    unknown = sorted(set(FLAGS.input_types) - set(INPUT_TYPES))
    if unknown:
        raise app.UsageError(f"unknown --input_types {unknown}; expected some of {INPUT_TYPES}")
    overrides = {
        k: getattr(FLAGS, k)
        for k in ("score_threshold", "max_detections")
        if getattr(FLAGS, k) is not None
    }
    task, model, label_map = cli.load_from_flags(FLAGS, overrides)
    export_saved_model(
        model,
        FLAGS.export_dir,
        input_types=FLAGS.input_types,
        label_map=label_map,
        jit_compile=FLAGS.jit_compile,
        task=task,
    )
    height, width = model.input_shape[1:3]
    print(
        f"exported {model.name} ({height}x{width} input, "
        f"{len(label_map)} labels) to {FLAGS.export_dir}: signatures "
        f"{', '.join(FLAGS.input_types)} (serving_default = {FLAGS.input_types[0]})",
        file=sys.stdout,
        flush=True,
    )


if __name__ == "__main__":
    app.run(main)
