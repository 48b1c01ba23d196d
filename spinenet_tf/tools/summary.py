"""Parameters and multiply-adds of SpineNet backbones and RetinaNet-SpineNet (91 classes),
and with --maskrcnn of Mask R-CNN-SpineNet (91 classes).

    python -m spinenet_tf.tools.summary --model_id=49 --image_size=640
    python -m spinenet_tf.tools.summary --all
    python -m spinenet_tf.tools.summary --model_id=49 --maskrcnn

Multiply-adds are TF profiler float operations / 2 on the inference graph at batch 1 (for
RetinaNet, the network without box decoding; for Mask R-CNN, the whole inference: 1,000
proposals through the box head, 100 detections through the mask head), the way Model
Garden reports its FLOPs.
"""

from __future__ import annotations

import sys

from spinenet_tf import console

# Before TensorFlow is imported: its start-up log lines would bury the table.
console.quiet_tensorflow("summary")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from spinenet_tf import specs  # noqa: E402
from spinenet_tf.layers.norm import unfused_batch_norm  # noqa: E402
from spinenet_tf.models.mask_rcnn import build_maskrcnn  # noqa: E402
from spinenet_tf.models.retinanet import build_retinanet  # noqa: E402
from spinenet_tf.models.spinenet import build_backbone  # noqa: E402


def count_parameters(model, trainable_only: bool = True) -> int:
    weights = model.trainable_weights if trainable_only else model.weights
    return int(sum(np.prod(w.shape) for w in weights))


def count_multiply_adds(model, image_hw: tuple[int, int], channels: int = 3) -> int:
    """Profiler float operations / 2 of one forward pass in inference mode at batch 1."""
    spec = tf.TensorSpec([1, *image_hw, channels], tf.float32)
    fn = tf.function(lambda x: model(x, training=False))
    # TF's profiler counts the elementwise ops of an unfused batch norm but nothing for the
    # fused kernel; Model Garden's figures include them, so count the same graph.
    with unfused_batch_norm():
        graph = fn.get_concrete_function(spec).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    profile = tf.compat.v1.profiler.profile(
        graph=graph, run_meta=tf.compat.v1.RunMetadata(), options=options
    )
    return int(profile.total_float_ops) // 2


def parse_image_size(value: str) -> tuple[int, int]:
    parts = str(value).lower().replace("x", ",").split(",")
    try:
        sizes = [int(p) for p in parts if p]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes, default=0) < 1:
        raise ValueError(f"image size {value!r} must be N or HxW with positive integers")
    return (sizes[0], sizes[-1])


def summarize(
    model_id: str, image_hw: tuple[int, int], num_classes: int = 91, maskrcnn: bool = False
) -> dict:
    backbone = build_backbone(model_id, input_shape=(*image_hw, 3))
    detector = build_retinanet(model_id, num_classes, image_hw)
    extra = {}
    if maskrcnn:
        model = build_maskrcnn(model_id, num_classes, image_hw)
        extra = {
            "maskrcnn_params": count_parameters(model),
            "maskrcnn_gmacs": count_multiply_adds(model, image_hw) / 1e9,
        }
    return {
        "model_id": model_id,
        "image_size": f"{image_hw[0]}x{image_hw[1]}",
        "params": count_parameters(backbone),
        "all_variables": count_parameters(backbone, trainable_only=False),
        "gmacs": count_multiply_adds(backbone, image_hw) / 1e9,
        "retinanet_params": count_parameters(detector),
        "retinanet_gmacs": count_multiply_adds(detector, image_hw) / 1e9,
        **extra,
    }


def format_table(rows: list[dict]) -> str:
    masks = all("maskrcnn_params" in r for r in rows)
    lines = [
        "| model_id | image size | backbone params | backbone variables | backbone GMACs | "
        "RetinaNet params | RetinaNet GMACs |"
        + (" Mask R-CNN params | Mask R-CNN GMACs |" if masks else ""),
        "|---|---|---|---|---|---|---|" + ("---|---|" if masks else ""),
    ]
    for r in rows:
        lines.append(
            f"| {r['model_id']} | {r['image_size']} | {r['params']:,} | "
            f"{r['all_variables']:,} | {r['gmacs']:.3f} | {r['retinanet_params']:,} | "
            f"{r['retinanet_gmacs']:.3f} |"
            + (f" {r['maskrcnn_params']:,} | {r['maskrcnn_gmacs']:.1f} |" if masks else "")
        )
    return "\n".join(lines)


FLAGS = flags.FLAGS


def define_flags():
    # Defined only when run as a program, so importing this module defines no flags.
    flags.DEFINE_multi_string("model_id", None, f"Model ids, of {', '.join(specs.MODEL_IDS)}.")
    flags.DEFINE_string("image_size", None, "N or HxW; default: the paper's size for the model.")
    flags.DEFINE_bool("all", False, "Summarise every model id at its paper image size.")
    flags.DEFINE_bool("maskrcnn", False, "Add Mask R-CNN-SpineNet's parameters and GMACs.")


def main(argv):
    del argv
    model_ids = list(specs.MODEL_IDS) if FLAGS.all else FLAGS.model_id
    if not model_ids:
        raise app.UsageError("give --model_id=ID (repeatable) or --all")
    rows = []
    for model_id in model_ids:
        specs.get_scaling(model_id)
        hw = (
            parse_image_size(FLAGS.image_size)
            if FLAGS.image_size
            else (specs.PAPER_IMAGE_SIZES[model_id],) * 2
        )
        rows.append(summarize(model_id, hw, maskrcnn=FLAGS.maskrcnn))
        print(f"summarised {model_id}", file=sys.stderr, flush=True)
    print(format_table(rows))


if __name__ == "__main__":
    define_flags()
    app.run(main)
