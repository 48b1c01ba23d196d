"""TFLite speed and size for SpineNet-Mobile: our float32, fp16, dynamic-range and int8
TFLite files against our SavedModel and against Model Garden's own TFLite export of the
same weights.

    python benchmarks/tflite.py [--configs=mobile-49XS@256,mobile-49S@384,mobile-49@384] \
        [--iters=20] [--threads=1,2] [--calibration_steps=32] [--no_model_garden]

Each config builds Model Garden's RetinaNet-SpineNet-Mobile with 91 classes (batch-norm
statistics and classifier randomised, as benchmarks/serving.py does, so that scores vary)
and converts its weights to ours. Our files come from `spinenet_tf.serving.tflite`
(post-processing: TFLITE_Detection_PostProcess; int8 calibrated on --calibration_steps
photo-like synthetic images, the post-processing float32). Model Garden's: its
DetectionModule with input_type='tflite' and nms_version='tflite', saved and converted by
its `export_tflite_lib.convert_tflite_model` (quant types None, fp16, default, int8; int8
calibrated on the same images). Latency: median of --iters batch-1 invocations on a
preprocessed image with the ai-edge-litert interpreter (XNNPACK) at each thread count; our
SavedModel ("image_tensor", uint8 of the input size) runs with TensorFlow's own threads (all
cores). Prints a table per config and the int8 / float32 ratios the issue targets (at least
2x faster, at least 3.5x smaller).
"""

from __future__ import annotations

import argparse
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

from spinenet_tf.models.retinanet import build_retinanet  # noqa: E402
from spinenet_tf.serving import tflite  # noqa: E402
from spinenet_tf.serving.export import export_saved_model  # noqa: E402
from spinenet_tf.tasks.base import ImageServing  # noqa: E402

NUM_CLASSES = 91
QUANTIZATIONS = ("none", "fp16", "dynamic", "int8")
MG_QUANT_TYPES = {"none": None, "fp16": "fp16", "dynamic": "default", "int8": "int8"}


def photo_like(size: int, seed: int) -> np.ndarray:
    """uint8 [size, size, 3]: smooth colour, texture and a few solid objects."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    f = rng.uniform(2, 8, 3)
    image = np.stack([120 + 100 * np.sin(f[0] * x), 100 + 80 * np.cos(f[1] * y), 90 + 60 * x * y])
    image = np.moveaxis(image, 0, -1) + rng.normal(0, 12, (size, size, 3))
    for _ in range(6):
        h, w = rng.integers(size // 8, size // 3, 2)
        y0, x0 = rng.integers(0, size - h), rng.integers(0, size - w)
        image[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0, 255, 3)
    return np.clip(image, 0, 255).astype(np.uint8)


def build_models(model_id: str, size: int, with_model_garden: bool):
    """(ours, Model Garden's or None) with the same weights."""
    if not with_model_garden:
        keras.utils.set_random_seed(0)
        ours = build_retinanet(model_id, NUM_CLASSES, size)
        rng = np.random.default_rng(0)
        for v in ours.variables:
            if "moving_variance" in v.path:
                v.assign(rng.uniform(0.5, 2.0, v.shape).astype("float32"))
        return ours, None
    from spinenet_tf.convert.model_garden import build_model_garden_retinanet, from_model_garden

    rng = np.random.default_rng(0)
    mg = build_model_garden_retinanet(model_id, NUM_CLASSES, size)
    for v in mg.variables:
        if "moving_variance" in v.name:
            v.assign(rng.uniform(0.5, 2.0, v.shape).astype("float32"))
        elif "head/scores/bias" in v.name:
            v.assign(rng.normal(-4.0, 0.5, v.shape).astype("float32"))
    ours = build_retinanet(model_id, NUM_CLASSES, size)
    from_model_garden(mg, ours)
    return ours, mg


def export_model_garden(mg, model_id: str, size: int, workdir: str, calibration) -> dict:
    """{quantization: path or error message} of Model Garden's own TFLite export."""
    from official.core import config_definitions as cfg
    from official.vision.configs import retinanet as mg_retinanet
    from official.vision.serving import detection, export_tflite_lib

    from spinenet_tf.convert.model_garden import (
        build_model_garden_retinanet,
        model_garden_retinanet_config,
    )

    config = model_garden_retinanet_config(model_id, NUM_CLASSES, size, nms_version="tflite")
    params = cfg.ExperimentConfig(task=mg_retinanet.RetinaNetTask(model=config))
    model = build_model_garden_retinanet(model_id, NUM_CLASSES, size, nms_version="tflite")
    model.set_weights(mg.get_weights())
    module = detection.DetectionModule(
        params, batch_size=1, input_image_size=[size, size], input_type="tflite", model=model
    )
    saved = os.path.join(workdir, f"mg_{model_id}")
    signatures = module.get_inference_signatures({"tflite": "serving_default"})
    tf.saved_model.save(module, saved, signatures=signatures)

    # Its int8 calibration reads the experiment's training data; ours has none here, so it
    # gets the images our int8 export calibrates on.
    def representative_dataset(params, task=None, calibration_steps=None):
        for image in calibration():
            yield [image]

    export_tflite_lib.representative_dataset = representative_dataset
    out = {}
    for quantization in QUANTIZATIONS:
        path = os.path.join(workdir, f"mg_{model_id}_{quantization}.tflite")
        try:
            data = export_tflite_lib.convert_tflite_model(
                saved_model_dir=saved,
                quant_type=MG_QUANT_TYPES[quantization],
                params=params,
                calibration_steps=1000,
            )
        except Exception as e:  # noqa: BLE001 - a failed conversion is a result here
            out[quantization] = f"fails: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            continue
        with open(path, "wb") as f:
            f.write(data)
        out[quantization] = path
    return out


def tflite_latency(path: str, image: np.ndarray, threads: int, iters: int) -> float:
    interpreter = tflite.make_interpreter(model_path=path, num_threads=threads)
    runner = interpreter.get_signature_runner()
    (name,) = runner.get_input_details()
    detail = runner.get_input_details()[name]
    if detail["dtype"] == np.uint8:
        scale, zero = detail["quantization"]
        image = np.clip(np.round(image / scale + zero), 0, 255).astype(np.uint8)
    for _ in range(2):
        runner(**{name: image})
    times = []
    for _ in range(iters):
        begin = time.perf_counter()
        runner(**{name: image})
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def saved_model_latency(model, size: int, workdir: str, pixels: np.ndarray, iters: int) -> float:
    path = os.path.join(workdir, f"saved_model_{model.name}")
    export_saved_model(model, path, input_types=["image_tensor"])
    serve = tf.saved_model.load(path).signatures["image_tensor"]
    inputs = tf.constant(pixels[None])
    for _ in range(2):
        serve(inputs=inputs)
    times = []
    for _ in range(iters):
        begin = time.perf_counter()
        float(tf.reduce_sum(serve(inputs=inputs)["detection_scores"]))
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def bench(model_id, size, args, workdir) -> dict:
    ours, mg = build_models(model_id, size, args.model_garden)
    serving = ImageServing((size, size))
    pixels = photo_like(size, seed=1000)
    image = serving.preprocess(pixels[None])[0].numpy()

    def calibration():
        for seed in range(args.calibration_steps):
            yield serving.preprocess(photo_like(size, seed)[None])[0].numpy()

    files = {}
    for quantization in QUANTIZATIONS:
        start = time.perf_counter()
        path = os.path.join(workdir, f"ours_{model_id}_{quantization}.tflite")
        tflite.export_tflite(
            ours,
            path,
            quantization,
            "custom_op",
            representative_dataset=calibration if quantization == "int8" else None,
        )
        files[("ours", quantization)] = path
        print(
            f"  {model_id}@{size} ours {quantization}: converted in "
            f"{time.perf_counter() - start:.0f}s",
            flush=True,
        )
    if mg is not None:
        start = time.perf_counter()
        for quantization, path in export_model_garden(
            mg, model_id, size, workdir, calibration
        ).items():
            files[("model_garden", quantization)] = path
        print(f"  {model_id}@{size} Model Garden: {time.perf_counter() - start:.0f}s", flush=True)
    rows = {}
    for (who, quantization), path in files.items():
        row = {"size": None, "latency": {}}
        if path.startswith("fails"):
            row["error"] = path
        else:
            row["size"] = os.path.getsize(path)
            for threads in args.threads:
                row["latency"][threads] = tflite_latency(path, image, threads, args.iters)
        rows[(who, quantization)] = row
        print(f"  {model_id}@{size} {who} {quantization}: {row}", flush=True)
    rows[("ours", "saved_model")] = {
        "size": None,
        "latency": {"tf": saved_model_latency(ours, size, workdir, pixels, args.iters)},
    }
    return rows


def print_table(name: str, rows: dict, threads) -> None:
    print(f"\n{name}")
    heads = " | ".join(f"{t} thread{'s' if t > 1 else ''}" for t in threads)
    print(f"| export | file | {heads} |")
    print("|---|---|" + "---|" * len(threads))
    for (who, quantization), row in rows.items():
        label = f"{who} {'float32' if quantization == 'none' else quantization}"
        if "error" in row:
            print(f"| {label} | {row['error']} |" + " |" * len(threads))
            continue
        if quantization == "saved_model":
            print(
                "| our SavedModel (TF threads) | | "
                + " | ".join(f"{row['latency']['tf'] * 1e3:.1f} ms" for _ in threads)
                + " |"
            )
            continue
        cells = " | ".join(f"{row['latency'][t] * 1e3:.1f} ms" for t in threads)
        print(f"| {label} | {row['size'] / 1e6:.2f} MB | {cells} |")
    f32, i8 = rows[("ours", "none")], rows[("ours", "int8")]
    speed = ", ".join(
        f"{f32['latency'][t] / i8['latency'][t]:.2f}x at {t} thread(s)" for t in threads
    )
    print(
        f"ours int8 vs float32: {speed} faster, {f32['size'] / i8['size']:.2f}x smaller "
        "(targets: 2x, 3.5x)"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="mobile-49XS@256,mobile-49S@384,mobile-49@384")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--calibration_steps", type=int, default=32)
    parser.add_argument(
        "--no_model_garden", dest="model_garden", action="store_false", help="ours only"
    )
    args = parser.parse_args()
    args.threads = [int(t) for t in args.threads.split(",")]
    print(
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPU cores, "
        f"batch 1, ai-edge-litert interpreter",
        flush=True,
    )
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for config in args.configs.split(","):
            model_id, size = config.split("@")
            results[config] = bench(model_id, int(size), args, workdir)
    for config, rows in results.items():
        print_table(config, rows, args.threads)


if __name__ == "__main__":
    main()
