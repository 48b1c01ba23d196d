"""Mask R-CNN speed: ours against TF Model Garden's, side by side in one process.

    python benchmarks/maskrcnn.py [--model_ids=49] [--image_size=640] [--iters=5]
        [--policies=float32,mixed_bfloat16]

For each model id (Model Garden's factory Mask R-CNN: 3 anchors a location, identity
decoder, 4-conv box head with an FC of 1024, 4-conv mask head; ours with the same heads),
under each dtype policy (both sides built under it):
- end-to-end inference at batch 1 (image in, at most 100 boxes and their 28 x 28 masks out,
  each side's default decoding: 1000 proposals, class-wise NMS), without and with XLA;
- in float32, a training step at batch 2 (forward with RPN targets, ROI sampling and mask
  targets, the five Mask R-CNN losses, backward, SGD with momentum), each side with its own
  targets and samplers on the same 8 ground-truth boxes and masks an image.
Prints median seconds and ratios Model Garden / ours (above 1: ours is faster), comparing
each side's best inference configuration. Needs the `modelgarden` extra.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from backbone import median_seconds, policy_args, train_step_fn  # noqa: E402

from spinenet_tf.convert.model_garden import build_model_garden_maskrcnn  # noqa: E402
from spinenet_tf.models.mask_rcnn import build_maskrcnn  # noqa: E402

NUM_CLASSES = 91
LEVELS = range(3, 8)


def _heads(model_id: str) -> tuple[int, int]:
    """(filters, FC dims) of the heads: tensorflow/tpu's 49S heads are narrower."""
    return (128, 512) if model_id == "49S" else (256, 1024)


def _ground_truth(size: int, batch: int):
    rng = np.random.default_rng(0)
    boxes = np.zeros((batch, 100, 4), np.float32)
    classes = np.full((batch, 100), -1, np.int32)
    for b in range(batch):
        for i in range(8):
            y, x = rng.uniform(0, size * 0.6, 2)
            h, w = rng.uniform(size * 0.05, size * 0.35, 2)
            boxes[b, i], classes[b, i] = [y, x, y + h, x + w], rng.integers(1, NUM_CLASSES)
    masks = (rng.uniform(size=(batch, 100, 112, 112)) > 0.5).astype(np.float32)
    return tf.constant(boxes), tf.constant(classes), tf.constant(masks)


def _build(model_id: str, size: int):
    filters, fc_dims = _heads(model_id)
    mg = build_model_garden_maskrcnn(model_id, NUM_CLASSES, size, filters, fc_dims)
    ours = build_maskrcnn(model_id, NUM_CLASSES, size)
    return mg, ours


def bench_inference(model_id: str, size: int, iters: int, policy: str) -> tuple[dict, tuple]:
    import tf_keras

    tf_keras.mixed_precision.set_global_policy(policy)
    keras.config.set_dtype_policy(policy)
    x1 = tf.random.uniform((1, size, size, 3), 0.0, 255.0)
    shape1 = tf.constant([[size, size]], tf.float32)
    tag = "" if policy == "float32" else f" {policy}"
    times = {}
    try:
        mg, ours = _build(model_id, size)
        for jit in (False, True):
            for side, fn in (
                ("mg", lambda x: mg(x, image_shape=shape1, training=False)),
                ("ours", ours.predict_step),
            ):
                key = f"{side}_infer_{'xla' if jit else 'graph'}"
                times[key] = median_seconds(tf.function(fn, jit_compile=jit), x1, iters=iters)
                print(f"  {model_id}{tag} {key}: {times[key]:.3f}s", flush=True)
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")
        keras.config.set_dtype_policy("float32")
    return times, (mg, ours)


def _mg_rpn_targets(size: int, boxes, classes):
    """Model Garden's RPN targets (its parser's), batched: {level: [B, h, w, A(*4)]}."""
    from official.vision.ops import anchor

    anchors = anchor.Anchor(3, 7, 1, [0.5, 1.0, 2.0], 3.0, (size, size)).multilevel_boxes
    labeler = anchor.RpnAnchorLabeler(0.7, 0.3, 256, 0.5)
    scores, deltas = [], []
    for b in range(boxes.shape[0]):
        keep = classes[b] > 0
        s, d = labeler.label_anchors(
            anchors, tf.boolean_mask(boxes[b], keep), tf.cast(classes[b][keep][:, None], tf.float32)
        )
        scores.append(s)
        deltas.append(d)
    stack = lambda parts: {k: tf.stack([p[k] for p in parts]) for k in parts[0]}  # noqa: E731
    batch = boxes.shape[0]
    return (
        {k: tf.tile(v[None], [batch, 1, 1, 1]) for k, v in anchors.items()},
        stack(scores),
        stack(deltas),
    )


def bench_train(mg, ours, size: int, iters: int) -> dict:
    import tf_keras
    from official.vision.losses import maskrcnn_losses as mg_losses

    x2 = tf.random.uniform((2, size, size, 3), 0.0, 255.0)
    boxes, classes, masks = _ground_truth(size, 2)
    anchors, score_targets, box_targets = _mg_rpn_targets(size, boxes, classes)
    shape2 = tf.constant([[size, size]] * 2, tf.float32)

    def mg_loss(x):
        out = mg(
            x,
            image_shape=shape2,
            anchor_boxes=anchors,
            gt_boxes=boxes,
            gt_classes=classes,
            gt_masks=masks,
            training=True,
        )
        return (
            mg_losses.RpnScoreLoss(256)(out["rpn_scores"], score_targets)
            + mg_losses.RpnBoxLoss(1.0 / 9)(out["rpn_boxes"], box_targets)
            + mg_losses.FastrcnnClassLoss()(out["class_outputs"], out["class_targets"])
            + mg_losses.FastrcnnBoxLoss(1.0)(
                out["box_outputs"], out["class_targets"], out["box_targets"]
            )
            + mg_losses.MaskrcnnLoss()(
                out["mask_outputs"], out["mask_targets"], out["mask_class_targets"]
            )
        )

    def ours_loss(x):
        out = ours({"images": x, "boxes": boxes, "classes": classes, "masks": masks}, training=True)
        return ours.losses_from(out)["total_loss"]

    times = {}
    for side, loss, variables, optimizer in (
        ("mg", mg_loss, mg.trainable_variables, tf_keras.optimizers.SGD(0.01, momentum=0.9)),
        ("ours", ours_loss, ours.trainable_variables, keras.optimizers.SGD(0.01, momentum=0.9)),
    ):
        step = train_step_fn(loss, variables, optimizer)
        times[f"{side}_train"] = median_seconds(step, x2, iters=iters)
        print(f"  {side} train step: {times[f'{side}_train']:.3f}s", flush=True)
    return times


def main():
    args = policy_args(__doc__, model_ids="49")
    policies = args.policies
    lines, best = [], {}
    for model_id in args.model_ids.split(","):
        for policy in policies:
            t, (mg, ours) = bench_inference(model_id, args.image_size, args.iters, policy)
            if policy == "float32":
                t.update(bench_train(mg, ours, args.image_size, args.iters))
            mg_best = min(t["mg_infer_graph"], t["mg_infer_xla"])
            ours_best = min(t["ours_infer_graph"], t["ours_infer_xla"])
            best.setdefault(model_id, []).append((mg_best, ours_best))
            train = (
                f"{t['mg_train']:.3f}s | {t['ours_train']:.3f}s | "
                f"{t['ours_train'] / t['mg_train']:.2f}x"
                if "mg_train" in t
                else "- | - | -"
            )
            lines.append(
                f"| {model_id} | {policy} | {t['mg_infer_graph']:.3f} / {t['mg_infer_xla']:.3f}s"
                f" | {t['ours_infer_graph']:.3f} / {t['ours_infer_xla']:.3f}s | "
                f"{ours_best / mg_best:.2f}x | {train} |"
            )
        mg_best = min(m for m, _ in best[model_id])
        ours_best = min(o for _, o in best[model_id])
        lines.append(
            f"| {model_id} | best of any policy | {mg_best:.3f}s | {ours_best:.3f}s | "
            f"{ours_best / mg_best:.2f}x | | | |"
        )
    print(
        "\n| model | policy | MG infer (graph / XLA) | ours infer (graph / XLA) | "
        "ours best / MG best | MG train b2 | ours train b2 | ours / MG |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
