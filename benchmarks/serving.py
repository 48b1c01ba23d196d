"""Serving speed: our SavedModel against a Model Garden export of the same model, in one run.

    python benchmarks/serving.py [--model_ids=49S] [--image_size=640] [--iters=10]

Both sides export RetinaNet-SpineNet at image_size with 91 classes and the same weights
(Model Garden's, converted to ours), serving encoded JPEG bytes at batch 1: decode, resize,
network, decoding and NMS inside the SavedModel, each side with its default decoding settings.
Model Garden's export is its own `official.vision.serving.detection.DetectionModule`. The
classifier is randomised and its bias shifted so that --candidates (anchor, class) pairs with
distinct scores pass the 0.05 threshold, as on a busy real image: a fresh head scores
everything at 0.01, below the threshold, and Model Garden's time depends strongly on this
count (measured here: 0.8 s with about 40% of all pairs above it, 7 s with none).
Both SavedModels are loaded in this process and called alternately; prints median latency per
request, the ratio Model Garden / ours (above 1: ours is faster) and how far the two exports'
detections differ. Needs the `modelgarden` extra.
"""

from __future__ import annotations

import io
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from backbone import base_parser  # noqa: E402
from PIL import Image  # noqa: E402

from spinenet_tf.convert.model_garden import (  # noqa: E402
    build_model_garden_retinanet,
    from_model_garden,
    model_garden_retinanet_config,
)
from spinenet_tf.models.retinanet import build_retinanet  # noqa: E402
from spinenet_tf.serving.export import Detector, export_saved_model  # noqa: E402

NUM_CLASSES = 91


def test_image(height: int, width: int) -> bytes:
    """A JPEG with smooth colour, texture and a few solid objects (compresses like a photo)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    image = np.stack([120 + 100 * np.sin(6 * x), 100 + 80 * np.cos(5 * y), 90 + 60 * x * y], -1)
    image += rng.normal(0, 12, image.shape)
    for _ in range(6):
        y0, x0 = rng.integers(0, height - 100), rng.integers(0, width - 100)
        image[y0 : y0 + rng.integers(40, 100), x0 : x0 + rng.integers(40, 100)] = rng.uniform(
            0, 255, 3
        )
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


TOP = 20


def matched_detections(a: dict, b: dict, top: int, score_tol=1e-4, box_tol=0.5) -> int:
    """How many of b's `top` best detections a also has (same class, score and box within
    tolerance). Only the best: near the 100th, which candidates survive depends on each side's
    pre-NMS selection (ours: top 1000 (anchor, class) pairs per level; Model Garden's default
    v2: top 5000 per class)."""
    n_a, n_b = int(a["num_detections"]), min(int(b["num_detections"]), top)
    count = 0
    for i in range(n_b):
        same = (
            (a["detection_classes"][:n_a] == b["detection_classes"][i])
            & (np.abs(a["detection_scores"][:n_a] - b["detection_scores"][i]) < score_tol)
            & (np.abs(a["detection_boxes"][:n_a] - b["detection_boxes"][i]).max(-1) < box_tol)
        )
        count += bool(same.any())
    return count


def export_model_garden(model, model_id: str, size: int, path: str):
    from official.core import config_definitions as cfg
    from official.vision.configs import retinanet as mg_retinanet
    from official.vision.serving import detection

    params = cfg.ExperimentConfig(
        task=mg_retinanet.RetinaNetTask(
            model=model_garden_retinanet_config(model_id, NUM_CLASSES, size)
        )
    )
    module = detection.DetectionModule(
        params, batch_size=1, input_image_size=[size, size], input_type="image_bytes", model=model
    )
    signatures = module.get_inference_signatures({"image_bytes": "serving_default"})
    tf.saved_model.save(module, path, signatures=signatures)


def bench(model_id: str, size: int, iters: int, candidates: int, workdir: str) -> dict:
    rng = np.random.default_rng(0)
    mg = build_model_garden_retinanet(model_id, NUM_CLASSES, size)
    for v in mg.variables:
        if "moving_variance" in v.name:
            v.assign(rng.uniform(0.5, 2.0, v.shape).astype("float32"))
        elif "head/scores/bias" in v.name:  # the classifier; shifted below
            v.assign(rng.normal(0.0, 0.5, v.shape).astype("float32"))
        elif (
            "head/scores/kernel" in v.name or "head/classnet-conv" in v.name and "kernel" in v.name
        ):
            # Model Garden starts them at stddev 1e-5 and 0.01: scores would tie across
            # positions, and which of the tied boxes NMS keeps is arbitrary on both sides.
            v.assign(rng.normal(0.0, 0.04, v.shape).astype("float32"))
    ours = build_retinanet(model_id, NUM_CLASSES, size)
    from_model_garden(mg, ours)
    # Shift the classifier bias so that `candidates` (anchor, class) pairs of the test image
    # score above the 0.05 threshold, as a trained detector's do on a busy image.
    encoded = tf.constant([test_image(size * 3 // 4, size)])
    image = tf.io.decode_image(encoded[0], channels=3)[None]
    network_input = Detector(ours).preprocess(image)[0]
    logits = tf.reshape(ours(network_input, training=False)["class_logits"][..., 1:], [-1])
    kth = float(tf.sort(logits, direction="DESCENDING")[candidates])
    for v in mg.variables:
        if "head/scores/bias" in v.name:
            v.assign_add(tf.fill(v.shape, float(np.log(0.05 / 0.95)) - kth))
    from_model_garden(mg, ours)
    logits = ours(network_input, training=False)["class_logits"][..., 1:]
    result = {"candidates": int(tf.reduce_sum(tf.cast(tf.sigmoid(logits) > 0.05, tf.int32)))}

    paths = {name: os.path.join(workdir, f"{model_id}_{name}") for name in ("mg", "ours")}
    start = time.perf_counter()
    export_model_garden(mg, model_id, size, paths["mg"])
    print(f"  {model_id} Model Garden export: {time.perf_counter() - start:.0f}s", flush=True)
    start = time.perf_counter()
    export_saved_model(ours, paths["ours"], input_types=["image_bytes"])
    print(f"  {model_id} our export: {time.perf_counter() - start:.0f}s", flush=True)

    serve = {k: tf.saved_model.load(p).signatures["serving_default"] for k, p in paths.items()}
    outputs = {k: fn(inputs=encoded) for k, fn in serve.items()}  # trace and warm up
    outputs = {k: fn(inputs=encoded) for k, fn in serve.items()}
    times = {k: [] for k in serve}
    for _ in range(iters):
        for k, fn in serve.items():  # alternate, so drift hits both sides alike
            begin = time.perf_counter()
            float(tf.reduce_sum(fn(inputs=encoded)["detection_scores"]))
            times[k].append(time.perf_counter() - begin)
    result.update({k: statistics.median(v) for k, v in times.items()})

    # The same weights should give the same detections (Model Garden's boxes are in the
    # resized image's pixels; image_info row 2 holds the scale back to the original). Near-
    # equal scores may come out in another order, so detections are matched as sets.
    mg_out = {k: v[0].numpy() for k, v in outputs["mg"].items()}
    our_out = {k: v[0].numpy() for k, v in outputs["ours"].items()}
    mg_out["detection_boxes"] = mg_out["detection_boxes"] / np.tile(mg_out["image_info"][2], 2)
    result["detections"] = (int(mg_out["num_detections"]), int(our_out["num_detections"]))
    result["matched"] = matched_detections(mg_out, our_out, TOP)
    print(
        f"  {model_id}: Model Garden {result['mg']:.3f}s, ours {result['ours']:.3f}s per request",
        flush=True,
    )
    return result


def main():
    parser = base_parser(__doc__)
    parser.set_defaults(model_ids="49S", iters=10)
    parser.add_argument(
        "--candidates", type=int, default=2000, help="(anchor, class) pairs above 0.05"
    )
    args = parser.parse_args()
    print(
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPU cores, "
        f"{args.image_size}px, float32, JPEG bytes at batch 1",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as workdir:
        rows = {
            m: bench(m, args.image_size, args.iters, args.candidates, workdir)
            for m in args.model_ids.split(",")
        }
    print(
        "\n| model | MG SavedModel | ours SavedModel | MG / ours | detections MG / ours | "
        f"candidates above 0.05 | ours of our top {TOP} also in MG's |"
    )
    print("|---|---|---|---|---|---|")
    for m, r in rows.items():
        print(
            f"| {m} | {r['mg']:.3f}s | {r['ours']:.3f}s | {r['mg'] / r['ours']:.2f}x | "
            f"{r['detections'][0]} / {r['detections'][1]} | {r['candidates']} | {r['matched']} |"
        )


if __name__ == "__main__":
    main()
