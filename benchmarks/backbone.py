"""Backbone speed: ours against TF Model Garden's, side by side in one process.

    python benchmarks/backbone.py [--model_ids=49S,49] [--image_size=640] [--iters=5] [--jit]

For each model id: forward pass at batch 1 (inference) and a training step at batch 2 (SGD
with momentum on a squared-feature loss), as tf.functions, Model Garden float32 vs ours
float32 and ours mixed_bfloat16. Prints median seconds and the ratio Model Garden / ours
(above 1 means ours is faster). Needs the `modelgarden` extra.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import spinenet_tf  # noqa: E402
from spinenet_tf.convert.model_garden import build_model_garden_backbone  # noqa: E402


def median_seconds(fn, *args, iters: int) -> float:
    for _ in range(2):  # trace / compile and warm up
        _block(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        _block(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _block(result):
    # Reading one value waits for the whole step to finish.
    leaves = tf.nest.flatten(result)
    return float(tf.reduce_sum(tf.cast(leaves[0], tf.float32)))


def forward_fn(model, jit: bool):
    return tf.function(lambda x: model(x, training=False), jit_compile=jit)


def train_step_fn(loss_fn, variables, optimizer, jit: bool = False):
    """A tf.function step: loss_fn(x) -> scalar, gradients, one optimizer update."""

    def step(x):
        with tf.GradientTape() as tape:
            loss = loss_fn(x)
        grads = tape.gradient(loss, variables)
        if isinstance(optimizer, keras.optimizers.Optimizer):
            optimizer.apply(grads, variables)
        else:  # Model Garden's tf_keras optimizers
            optimizer.apply_gradients(zip(grads, variables, strict=True))
        return loss

    return tf.function(step, jit_compile=jit)


def squared_features_loss(model):
    def loss(x):
        out = model(x, training=True)
        return tf.add_n(
            [tf.reduce_mean(tf.square(tf.cast(v, tf.float32))) for v in tf.nest.flatten(out)]
        )

    return loss


def policy_args(doc: str, **defaults):
    """Parsed arguments of a benchmark timing inference under several dtype policies
    (--policies, a list) and the training step in float32; prints the run's header."""
    parser = base_parser(doc)
    parser.add_argument(
        "--policies",
        default="float32,mixed_bfloat16",
        help="dtype policies to time inference under, e.g. float32,mixed_bfloat16 (the "
        "training step is timed in float32)",
    )
    parser.set_defaults(**defaults)
    args = parser.parse_args()
    args.policies = args.policies.split(",")
    print(
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPU cores, "
        f"{args.image_size}px, inference under {', '.join(args.policies)}",
        flush=True,
    )
    return args


def base_parser(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark here takes."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--model_ids", default="49S,49")
    parser.add_argument("--image_size", type=int, default=640)
    parser.add_argument("--iters", type=int, default=5)
    return parser


def bench_model_id(model_id: str, size: int, iters: int, jit: bool, train: bool) -> dict:
    import tf_keras

    hw = (size, size, 3)
    x1 = tf.random.uniform((1, *hw))
    x2 = tf.random.uniform((2, *hw))
    rows = {}
    keras.config.set_dtype_policy("float32")
    contenders = [
        (
            "model_garden_fp32",
            lambda: build_model_garden_backbone(model_id, input_shape=hw),
            lambda: tf_keras.optimizers.SGD(0.01, momentum=0.9),
        ),
        (
            "ours_fp32",
            lambda: spinenet_tf.build_backbone(model_id, input_shape=hw),
            lambda: keras.optimizers.SGD(0.01, momentum=0.9),
        ),
        (
            "ours_bf16",
            lambda: spinenet_tf.build_backbone(model_id, input_shape=hw),
            lambda: keras.optimizers.SGD(0.01, momentum=0.9),
        ),
    ]
    for name, build, make_optimizer in contenders:
        keras.config.set_dtype_policy("mixed_bfloat16" if name.endswith("bf16") else "float32")
        model = build()
        forward = median_seconds(forward_fn(model, jit), x1, iters=iters)
        step = None
        if train:
            step = median_seconds(
                train_step_fn(
                    squared_features_loss(model), model.trainable_variables, make_optimizer(), jit
                ),
                x2,
                iters=iters,
            )
        rows[name] = (forward, step)
        print(
            f"  {model_id} {name}: forward {forward:.3f}s"
            + (f", train step {step:.3f}s" if step else ""),
            flush=True,
        )
        del model
    keras.config.set_dtype_policy("float32")
    return rows


def main():
    parser = base_parser(__doc__)
    parser.add_argument("--jit", action="store_true", help="compile both sides with XLA")
    parser.add_argument("--no_train", action="store_true", help="forward passes only")
    args = parser.parse_args()

    cpu = os.cpu_count()
    print(
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {cpu} CPU cores, "
        f"devices {[d.device_type for d in tf.config.list_physical_devices()]}, "
        f"XLA {'on' if args.jit else 'off'}, {args.image_size}px",
        flush=True,
    )
    results = {}
    for model_id in args.model_ids.split(","):
        results[model_id] = bench_model_id(
            model_id, args.image_size, args.iters, args.jit, not args.no_train
        )

    print(
        "\n| model | pass | Model Garden fp32 | ours fp32 | ours bf16 | MG/ours fp32 | "
        "MG/ours bf16 |"
    )
    print("|---|---|---|---|---|---|---|")
    for model_id, rows in results.items():
        for i, label in enumerate(("forward b1", "train step b2")):
            mg, ours, bf16 = (rows[k][i] for k in ("model_garden_fp32", "ours_fp32", "ours_bf16"))
            if mg is None:
                continue
            print(
                f"| {model_id} | {label} | {mg:.3f}s | {ours:.3f}s | {bf16:.3f}s | "
                f"{mg / ours:.2f}x | {mg / bf16:.2f}x |"
            )


if __name__ == "__main__":
    main()
