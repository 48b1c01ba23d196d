"""Training-step speed: our trainer's step against Model Garden's RetinaNet task's, in one process.

    python benchmarks/train_step.py [--model_ids=49S] [--image_size=640] [--iters=5]
        [--batch_size=2] [--policies=float32,mixed_bfloat16] [--jit]

Each side's whole step as its trainer runs it, on one fixed batch (8 boxes per image):
- ours: `Trainer`'s compiled loop for one step: targets gathered from the input pipeline's
  anchor matches, forward in training mode (batch norm as configured: sync, which on one
  replica is the fused kernel), focal + Huber loss, L2 regularisation, gradient, our SGD
  (momentum 0.9, warm-up schedule);
- Model Garden's: `RetinaNetTask.train_step` (labels from its parser's AnchorLabeler, built
  outside the step as its input pipeline does; use_sync_bn=True as its SpineNet recipes),
  with the SGD and warm-up of its OptimizerFactory.
Both sides build their model under each dtype policy (mixed_bfloat16: bfloat16 compute,
float32 variables, as on TPUs). Prints median seconds and Model Garden / ours (above 1: ours is
faster). Needs the `modelgarden` extra.
"""

from __future__ import annotations

import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from backbone import base_parser, median_seconds  # noqa: E402

from spinenet_tf.convert.model_garden import (  # noqa: E402
    build_model_garden_retinanet_task,
    build_model_garden_sgd,
    model_garden_retinanet_labels,
)
from spinenet_tf.training.trainer import (  # noqa: E402
    DataConfig,
    ExperimentConfig,
    OptimizerConfig,
    Trainer,
)

NUM_CLASSES = 91
WEIGHT_DECAY = 4e-5
LEARNING_RATE = 0.01


def _groundtruth(batch: int, size: int) -> dict:
    rng = np.random.default_rng(0)
    boxes = np.zeros((batch, 100, 4), np.float32)
    classes = np.full((batch, 100), -1, np.int32)
    for b in range(batch):
        for i in range(8):
            h, w = rng.uniform(0.05, 0.3, 2) * size
            y, x = rng.uniform(0, size - h), rng.uniform(0, size - w)
            boxes[b, i], classes[b, i] = [y, x, y + h, x + w], rng.integers(1, NUM_CLASSES)
    return {"boxes": boxes, "classes": classes}


def model_garden_step(model_id, size, images, groundtruth, jit):
    task = build_model_garden_retinanet_task(model_id, NUM_CLASSES, size, WEIGHT_DECAY)
    model = task.build_model()
    optimizer = build_model_garden_sgd(task, LEARNING_RATE, 0.9, 100, LEARNING_RATE / 10)
    labels = model_garden_retinanet_labels(task, groundtruth)
    metrics = task.build_metrics(training=True)
    step = tf.function(
        lambda x: task.train_step((x, labels), model, optimizer, metrics)["total_loss"],
        jit_compile=jit,
    )
    return step


def our_step(model_id, size, policy, images, groundtruth, jit, model_dir):
    config = ExperimentConfig(
        model_id=model_id,
        num_classes=NUM_CLASSES,
        image_size=size,
        model_overrides={"weight_decay": WEIGHT_DECAY},
        train=DataConfig(global_batch_size=len(images)),
        optimizer=OptimizerConfig(
            learning_rate=LEARNING_RATE,
            reference_batch_size=len(images),
            warmup_steps=100,
            warmup_learning_rate=LEARNING_RATE / 10,
        ),
        train_steps=1000,
        dtype_policy=policy,
        jit_compile=jit,
    )
    trainer = Trainer(config, model_dir)
    labels = dict(groundtruth, **trainer.model.labeler.matches(groundtruth))
    dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
    iterator = iter(trainer.strategy.experimental_distribute_dataset(dataset))
    loop = trainer._make_train_loop()
    one = tf.constant(1)
    return lambda x: loop(iterator, one)["total_loss"]


def bench(model_id: str, size: int, batch: int, iters: int, policy: str, jit: bool) -> dict:
    import tf_keras

    images = tf.random.stateless_uniform((batch, size, size, 3), seed=(0, 0))
    groundtruth = _groundtruth(batch, size)
    times = {}
    tf_keras.mixed_precision.set_global_policy(policy)
    try:
        step = model_garden_step(model_id, size, images, groundtruth, jit)
        times["mg"] = median_seconds(step, images, iters=iters)
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")
    print(f"  {model_id} {policy} Model Garden train step: {times['mg']:.3f}s", flush=True)
    with tempfile.TemporaryDirectory() as model_dir:
        try:
            step = our_step(model_id, size, policy, images, groundtruth, jit, model_dir)
            times["ours"] = median_seconds(step, images, iters=iters)
        finally:
            keras.config.set_dtype_policy("float32")
    print(f"  {model_id} {policy} our train step: {times['ours']:.3f}s", flush=True)
    return times


def main():
    parser = base_parser(__doc__)
    parser.set_defaults(model_ids="49S")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--policies", default="float32,mixed_bfloat16")
    parser.add_argument("--jit", action="store_true", help="compile both steps with XLA")
    args = parser.parse_args()
    print(
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPU cores, "
        f"{args.image_size}px, batch {args.batch_size}, XLA {args.jit}",
        flush=True,
    )
    rows = [
        (m, p, bench(m, args.image_size, args.batch_size, args.iters, p, args.jit))
        for m in args.model_ids.split(",")
        for p in args.policies.split(",")
    ]
    print("\n| model | policy | Model Garden step | our step | Model Garden / ours |")
    print("|---|---|---|---|---|")
    for m, p, t in rows:
        print(f"| {m} | {p} | {t['mg']:.3f}s | {t['ours']:.3f}s | {t['mg'] / t['ours']:.2f}x |")


if __name__ == "__main__":
    main()
