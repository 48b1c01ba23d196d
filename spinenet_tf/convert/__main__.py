"""Convert a Model Garden checkpoint into spinenet_tf weights.

    python -m spinenet_tf.convert --model_id=49 --checkpoint=/path/ckpt-500000 \
        --output=spinenet49.weights.h5
    python -m spinenet_tf.convert --model_id=49 --checkpoint=/path/ckpt-500000 \
        --num_classes=91 --output=converted/retinanet49/ckpt
    python -m spinenet_tf.convert --model_id=49 --checkpoint=/path/ckpt-231000 \
        --num_classes=91 --head=maskrcnn --output=converted/maskrcnn49/ckpt

Model Garden publishes `tf.train.Checkpoint(model=detector)` files; checkpoints of a bare
backbone (`tf.train.Checkpoint(backbone=...)`) work too. Without --num_classes the backbone
is converted; with it, the whole detector (backbone and heads, Model Garden's with that many
classes): a RetinaNet, or with --head=maskrcnn a Mask R-CNN (Model Garden's factory model of 3
anchors a location; ids 49S, 49, 96, 143). --output ending in .weights.h5 or .keras writes
Keras files; an output without an extension is a checkpoint prefix, which an experiment
starts from with `ExperimentConfig.init_checkpoint` (fine-tuning, also with other classes)
and which export and predict read as --checkpoint. Needs the `modelgarden` extra.
"""

from __future__ import annotations

from spinenet_tf import console

console.quiet_tensorflow("convert")

import os  # noqa: E402

import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from spinenet_tf import specs  # noqa: E402
from spinenet_tf.convert.model_garden import (  # noqa: E402
    build_model_garden_backbone,
    build_model_garden_maskrcnn,
    build_model_garden_retinanet,
    from_model_garden,
)
from spinenet_tf.models.mask_rcnn import build_maskrcnn  # noqa: E402
from spinenet_tf.models.retinanet import build_retinanet  # noqa: E402
from spinenet_tf.models.spinenet import build_backbone  # noqa: E402
from spinenet_tf.training.checkpoints import model_variables  # noqa: E402

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
    num_classes: int | None = None,
    head: str = "retinanet",
):
    """Converts a Model Garden checkpoint: the backbone, or with num_classes the detector
    (`head` 'retinanet' or 'maskrcnn'); returns our model. See the module docstring for
    `output`."""
    if head not in MAKERS:
        raise ValueError(f"--head must be one of {sorted(MAKERS)}, got {head!r}")
    extension = os.path.splitext(os.path.basename(output))[1]
    keras_file = output.endswith(".weights.h5") or output.endswith(".keras")
    if extension and not keras_file:
        raise ValueError(
            f"--output {output!r} must end in .weights.h5 or .keras, or be a checkpoint prefix "
            "without an extension (e.g. converted/ckpt)"
        )
    size = image_size or specs.PAPER_IMAGE_SIZES[specs.get_scaling(model_id).model_id]
    if num_classes:
        if (min_level, max_level) != (3, 7) or activation:
            raise ValueError(
                "--num_classes converts Model Garden's detector as its SpineNet recipes build "
                "it (levels 3-7, the model id's activation); drop --min_level, --max_level and "
                "--activation"
            )
        make_source, make_target = MAKERS[head]
        source = make_source(model_id, num_classes, size)
        path = restore_model_garden_detector(source, checkpoint, head)
        target = make_target(model_id, num_classes, size)
    else:
        kwargs = dict(min_level=min_level, max_level=max_level)
        if activation:
            kwargs["activation"] = activation
        source = build_model_garden_backbone(model_id, input_shape=(size, size, 3), **kwargs)
        path = restore_model_garden_backbone(source, checkpoint)
        target = build_backbone(model_id, **kwargs)
    from_model_garden(source, target)
    if output.endswith(".keras"):
        target.save(output)
    elif keras_file:
        target.save_weights(output)
    else:
        tf.io.gfile.makedirs(os.path.dirname(output) or ".")
        tf.train.Checkpoint(model=model_variables(target)).write(output)
    logging.info("converted %s (%s) -> %s", path, model_id, output)
    return target


def _model_garden_maskrcnn(model_id: str, num_classes: int, size: int):
    scaling = specs.get_scaling(model_id)
    if scaling.model_id not in ("49S", "49", "96", "143"):
        raise ValueError(
            f"--head=maskrcnn converts Model Garden's Mask R-CNN of ids 49S, 49, 96 and 143 "
            f"(its factory's heads); got {model_id!r}"
        )
    narrow = scaling.model_id == "49S"  # tensorflow/tpu's 49S heads: 128 filters, FC 512
    return build_model_garden_maskrcnn(
        model_id, num_classes, size, 128 if narrow else 256, 512 if narrow else 1024
    )


# --head: (Model Garden's detector, ours), each from (model_id, num_classes, image size).
MAKERS = {
    "retinanet": (build_model_garden_retinanet, build_retinanet),
    "maskrcnn": (_model_garden_maskrcnn, build_maskrcnn),
}


def restore_model_garden_detector(detector, checkpoint: str, head: str = "retinanet") -> str:
    """Reads `checkpoint` into a Model Garden detector; raises naming the file on failure."""
    path = tf.train.latest_checkpoint(checkpoint) if tf.io.gfile.isdir(checkpoint) else checkpoint
    if not path or not tf.io.gfile.glob(path + "*"):
        raise FileNotFoundError(f"no checkpoint at {checkpoint!r}")
    status = tf.train.Checkpoint(model=detector).read(path)
    try:
        status.assert_existing_objects_matched()
    except (AssertionError, ValueError) as e:
        raise ValueError(
            f"checkpoint {path!r} holds no {head} matching Model Garden's of this model id, "
            f"--num_classes and --head: {str(e).splitlines()[0]}"
        ) from None
    status.expect_partial()
    return path


FLAGS = flags.FLAGS


def define_flags():
    # Defined only when run as a program, so importing this module defines no flags.
    flags.DEFINE_string("model_id", None, f"One of {', '.join(specs.MODEL_IDS)}.")
    flags.DEFINE_string("checkpoint", None, "Model Garden checkpoint prefix or directory.")
    flags.DEFINE_string(
        "output",
        None,
        "Where to write: *.weights.h5 (weights), *.keras (model) or a checkpoint prefix "
        "without extension (for init_checkpoint, export and predict).",
    )
    flags.DEFINE_integer(
        "num_classes",
        None,
        "Convert the whole detector (backbone and heads), Model Garden's with this many "
        "classes (COCO: 91); default: the backbone only.",
    )
    flags.DEFINE_enum(
        "head", "retinanet", ["retinanet", "maskrcnn"], "The detector --num_classes converts."
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
        FLAGS.num_classes,
        FLAGS.head,
    )
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
