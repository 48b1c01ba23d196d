"""Convert a Model Garden checkpoint into spinenet_tf weights.

    python -m spinenet_tf.convert --model_id=49 --checkpoint=/path/ckpt-500000 \
        --output=spinenet49.weights.h5

Model Garden publishes `tf.train.Checkpoint(model=detector)` files; checkpoints of a bare
backbone (`tf.train.Checkpoint(backbone=...)`) work too. Only the backbone is converted.
Needs the `modelgarden` extra.
"""

from __future__ import annotations

from spinenet_tf import console

console.quiet_tensorflow("convert")

import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from spinenet_tf import specs  # noqa: E402
from spinenet_tf.convert.model_garden import (  # noqa: E402
    build_model_garden_backbone,
    from_model_garden,
)
from spinenet_tf.models.spinenet import build_backbone  # noqa: E402

# Where a backbone sits in the object graphs Model Garden writes: its detectors keep it in
# `_backbone` and save as `model`; backbone-only checkpoints use `backbone`.
_ROOTS = (
    lambda m: tf.train.Checkpoint(model=tf.train.Checkpoint(_backbone=m)),
    lambda m: tf.train.Checkpoint(model=tf.train.Checkpoint(backbone=m)),
    lambda m: tf.train.Checkpoint(backbone=m),
    lambda m: tf.train.Checkpoint(model=m),
)


def restore_model_garden_backbone(backbone, checkpoint: str):
    """Reads `checkpoint` into a Model Garden backbone; raises naming the file on failure."""
    path = tf.train.latest_checkpoint(checkpoint) if tf.io.gfile.isdir(checkpoint) else checkpoint
    if not path or not tf.io.gfile.glob(path + "*"):
        raise FileNotFoundError(f"no checkpoint at {checkpoint!r}")
    errors = []
    for make_root in _ROOTS:
        status = make_root(backbone).read(path)
        try:
            status.assert_existing_objects_matched()
            status.expect_partial()
            return path
        except (AssertionError, ValueError) as e:
            errors.append(str(e).splitlines()[0])
    raise ValueError(
        f"checkpoint {path!r} holds no backbone matching this Model Garden SpineNet "
        f"(wrong --model_id or --min_level/--max_level?): {errors[0]}"
    )


def convert(
    model_id: str,
    checkpoint: str,
    output: str,
    min_level: int = 3,
    max_level: int = 7,
    activation: str | None = None,
    image_size: int | None = None,
):
    if not (output.endswith(".weights.h5") or output.endswith(".keras")):
        raise ValueError(f"--output {output!r} must end in .weights.h5 or .keras")
    kwargs = dict(min_level=min_level, max_level=max_level)
    if activation:
        kwargs["activation"] = activation
    size = image_size or specs.PAPER_IMAGE_SIZES[specs.get_scaling(model_id).model_id]
    source = build_model_garden_backbone(model_id, input_shape=(size, size, 3), **kwargs)
    path = restore_model_garden_backbone(source, checkpoint)
    target = build_backbone(model_id, **kwargs)
    from_model_garden(source, target)
    if output.endswith(".keras"):
        target.save(output)
    else:
        target.save_weights(output)
    logging.info("converted %s (%s) -> %s", path, model_id, output)
    return target


FLAGS = flags.FLAGS


def define_flags():
    # Defined only when run as a program, so importing this module defines no flags.
    flags.DEFINE_string("model_id", None, f"One of {', '.join(specs.MODEL_IDS)}.")
    flags.DEFINE_string("checkpoint", None, "Model Garden checkpoint prefix or directory.")
    flags.DEFINE_string(
        "output", None, "Where to write: *.weights.h5 (weights) or *.keras (model)."
    )
    flags.DEFINE_integer("min_level", 3, "Lowest output level the checkpoint's model used.")
    flags.DEFINE_integer("max_level", 7, "Highest output level the checkpoint's model used.")
    flags.DEFINE_string("activation", None, "relu or swish; default: the model id's.")
    flags.DEFINE_integer(
        "image_size",
        None,
        "Square input size the checkpoint's model was built with; default: the model id's paper "
        "size. Only whether it is static matters (Model Garden wires static-size models "
        "differently), so any multiple of 128 works.",
    )
    flags.mark_flags_as_required(["model_id", "checkpoint", "output"])


def main(argv):
    del argv
    convert(
        FLAGS.model_id,
        FLAGS.checkpoint,
        FLAGS.output,
        FLAGS.min_level,
        FLAGS.max_level,
        FLAGS.activation,
        FLAGS.image_size,
    )
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
