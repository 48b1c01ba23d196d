"""RetinaNet speed: ours against TF Model Garden's, side by side in one process.

    python benchmarks/retinanet.py [--model_ids=49S,49] [--image_size=640] [--iters=5]
        [--policies=float32,mixed_bfloat16]

For each model id, under each dtype policy (both sides built under it; mixed_bfloat16 computes
in bfloat16 with float32 variables, as on TPUs; our decoding always runs in float32):
- end-to-end inference at batch 1 (image in, at most 100 detections out, each side's default
  decoding: score threshold 0.05, class-aware NMS at IoU 0.5; pre-NMS selection top 1000 per
  level for ours, top 5000 per class for Model Garden's), without and with XLA; for ours also
  with the CPU NMS kernel (nms="combined");
- in float32, a training step at batch 2 (forward, the same focal + Huber loss on precomputed
  targets, backward, SGD with momentum).
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

from spinenet_tf.convert.model_garden import build_model_garden_retinanet  # noqa: E402
from spinenet_tf.models.base import flatten_levels
from spinenet_tf.models.retinanet import build_retinanet  # noqa: E402
from spinenet_tf.ops.postprocess import DetectionConfig  # noqa: E402
from spinenet_tf.ops.targets import retinanet_losses  # noqa: E402

NUM_CLASSES = 91


def _targets(model, batch):
    boxes = np.zeros((batch, 100, 4), np.float32)
    classes = np.full((batch, 100), -1, np.int32)
    rng = np.random.default_rng(0)
    for b in range(batch):
        for i in range(8):
            y, x = rng.uniform(0, 400, 2)
            h, w = rng.uniform(30, 200, 2)
            boxes[b, i], classes[b, i] = [y, x, y + h, x + w], rng.integers(1, NUM_CLASSES)
    return {
        k: tf.constant(v)
        for k, v in model.labeler.targets({"boxes": boxes, "classes": classes}).items()
    }


def bench_inference(model_id: str, size: int, iters: int, policy: str) -> tuple[dict, object]:
    """End-to-end inference times of both sides under a dtype policy; returns ours too."""
    import tf_keras

    tf_keras.mixed_precision.set_global_policy(policy)
    keras.config.set_dtype_policy(policy)
    x1 = tf.random.uniform((1, size, size, 3))
    shape1 = tf.constant([[size, size]], tf.float32)
    times = {}
    tag = "" if policy == "float32" else f" {policy}"
    try:
        mg = build_model_garden_retinanet(model_id, NUM_CLASSES, size)
        for jit in (False, True):
            key = "mg_infer_xla" if jit else "mg_infer_graph"
            fn = tf.function(lambda x: mg(x, image_shape=shape1, training=False), jit_compile=jit)
            times[key] = median_seconds(fn, x1, iters=iters)
            print(
                f"  {model_id}{tag} Model Garden inference xla={jit}: {times[key]:.3f}s", flush=True
            )

        ours = build_retinanet(model_id, NUM_CLASSES, size)
        for label, config, jit in [
            ("graph", DetectionConfig(), False),
            ("xla", DetectionConfig(), True),
            ("combined", DetectionConfig(nms="combined"), False),
        ]:
            ours.detection_config = config
            fn = tf.function(ours.predict_step, jit_compile=jit)
            times[f"ours_infer_{label}"] = median_seconds(fn, x1, iters=iters)
            print(
                f"  {model_id}{tag} ours inference {label}: {times[f'ours_infer_{label}']:.3f}s",
                flush=True,
            )
        ours.detection_config = DetectionConfig()
        net = tf.function(lambda x: ours(x, training=False))
        times["ours_network"] = median_seconds(net, x1, iters=iters)
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")
        keras.config.set_dtype_policy("float32")
    return times, (mg, ours)


def bench(model_id: str, size: int, iters: int, policies) -> dict:
    import tf_keras

    x2 = tf.random.uniform((2, size, size, 3))
    rows = {}
    for policy in policies:
        rows[policy], models = bench_inference(model_id, size, iters, policy)
        if policy == "float32":
            mg, ours = models
    if "float32" not in rows:
        return rows
    times = rows["float32"]
    targets = _targets(ours, 2)
    levels = range(3, 8)

    def mg_loss(x):
        out = mg(x, training=True)
        logits = flatten_levels(
            {f"P{lv}": out["cls_outputs"][str(lv)] for lv in levels}, NUM_CLASSES
        )
        deltas = flatten_levels({f"P{lv}": out["box_outputs"][str(lv)] for lv in levels}, 4)
        return retinanet_losses(logits, deltas, targets)["total_loss"]

    def ours_loss(x):
        out = ours(x, training=True)
        return retinanet_losses(out["class_logits"], out["box_deltas"], targets)["total_loss"]

    mg_step = train_step_fn(
        mg_loss, mg.trainable_variables, tf_keras.optimizers.SGD(0.01, momentum=0.9)
    )
    ours_step = train_step_fn(
        ours_loss, ours.trainable_variables, keras.optimizers.SGD(0.01, momentum=0.9)
    )
    times["mg_train"] = median_seconds(mg_step, x2, iters=iters)
    times["ours_train"] = median_seconds(ours_step, x2, iters=iters)
    print(
        f"  {model_id} train step: Model Garden {times['mg_train']:.3f}s, "
        f"ours {times['ours_train']:.3f}s",
        flush=True,
    )
    return rows


def main():
    args = policy_args(__doc__)
    policies = args.policies
    results = {
        m: bench(m, args.image_size, args.iters, policies) for m in args.model_ids.split(",")
    }
    print(
        "\n| model | policy | MG infer (graph / XLA) | ours infer (graph / XLA / combined NMS) | "
        "ours network only | MG best / ours best | MG train b2 | ours train b2 | MG/ours |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for m, rows in results.items():
        for policy, t in rows.items():
            train = (
                f"{t['mg_train']:.3f}s | {t['ours_train']:.3f}s | "
                f"{t['mg_train'] / t['ours_train']:.2f}x"
                if "mg_train" in t
                else "- | - | -"
            )
            print(
                f"| {m} | {policy} | {t['mg_infer_graph']:.3f} / {t['mg_infer_xla']:.3f}s | "
                f"{t['ours_infer_graph']:.3f} / {t['ours_infer_xla']:.3f} / "
                f"{t['ours_infer_combined']:.3f}s | {t['ours_network']:.3f}s | "
                f"{_mg_best(t) / _ours_best(t):.2f}x | {train} |"
            )
        if len(rows) > 1:
            mg_best = min(_mg_best(t) for t in rows.values())
            ours_best = min(_ours_best(t) for t in rows.values())
            print(
                f"| {m} | best of any policy | {mg_best:.3f}s | {ours_best:.3f}s | | | "
                f"{mg_best / ours_best:.2f}x | | | |"
            )


def _mg_best(t: dict) -> float:
    return min(t["mg_infer_graph"], t["mg_infer_xla"])


def _ours_best(t: dict) -> float:
    return min(t["ours_infer_graph"], t["ours_infer_xla"], t["ours_infer_combined"])


if __name__ == "__main__":
    main()
