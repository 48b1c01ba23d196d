"""Flags shared by the serving commands (export, predict): which trained model to load."""

from __future__ import annotations

from absl import app, flags

from spinenet_tf.serving.load import load_model


def define_model_flags():
    flags.DEFINE_multi_string("gin_file", [], "The experiment's gin files, as given to train.")
    flags.DEFINE_multi_string("gin_param", [], "Gin bindings applied after the files.")
    flags.DEFINE_string("checkpoint", None, "A checkpoint prefix, or a model_dir (its latest).")
    flags.DEFINE_string(
        "label_map",
        None,
        "Label map JSON or COCO annotation file; default: the experiment's data.",
    )
    flags.DEFINE_enum(
        "dtype_policy",
        "float32",
        ["float32", "mixed_bfloat16", "mixed_float16"],
        "Compute precision of the network (weights stay float32; decoding is float32). "
        "mixed_bfloat16 is about 1.4x faster on CPUs with AVX512_BF16 and on TPUs.",
    )


def load_from_flags(flag_values, overrides: dict | None = None):
    """(task, model, label map) from --gin_file / --gin_param / --checkpoint / --label_map,
    with the task's serving overrides; bad values become usage errors that name them."""
    if not flag_values.checkpoint or not flag_values.gin_file:
        raise app.UsageError("a trained model needs both --gin_file and --checkpoint")
    try:
        return load_model(
            flag_values.gin_file,
            flag_values.gin_param,
            flag_values.checkpoint,
            label_map_path=flag_values.label_map,
            overrides=overrides,
            dtype_policy=flag_values.dtype_policy,
        )
    except (OSError, TypeError, ValueError) as e:  # gin files / bindings, checkpoint, labels
        raise app.UsageError(str(e)) from None
