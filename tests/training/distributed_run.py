"""Runs a tiny Trainer under a strategy in its own process (tests/training/test_distributed.py).

    python tests/training/distributed_run.py STRATEGY OUT_NPZ TRAIN_PATTERN
STRATEGY: default | mirrored2 (two logical CPUs) | multi_worker (TF_CONFIG from the env).
Writes the per-loop losses and the final weights to OUT_NPZ.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def main(strategy_name: str, out: str, pattern: str):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from spinenet_tf.training.trainer import DataConfig, ExperimentConfig, OptimizerConfig, Trainer

    if strategy_name == "mirrored2":
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    elif strategy_name == "multi_worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()
    config = ExperimentConfig(
        model_id="49S",
        num_classes=5,
        image_size=64,
        model_overrides=dict(
            filter_size_scale=0.25,
            endpoints_num_filters=16,
            head_num_filters=16,
            head_num_convs=1,
            min_level=3,
            max_level=5,
        ),
        train=DataConfig(source=pattern, global_batch_size=4, shuffle_buffer=0),
        optimizer=OptimizerConfig(learning_rate=0.64, warmup_steps=0),
        train_steps=3,
        steps_per_loop=1,
        checkpoint_every=3,
        sync_batch_norm=True,
        seed=1,
        deterministic=True,
    )
    trainer = Trainer(
        config, os.path.join(os.path.dirname(out), "model_" + strategy_name), strategy
    )
    trainer.train()
    losses = [h["total_loss"] for h in trainer.history]
    np.savez(
        out,
        losses=np.array(losses),
        **{f"w{i}": v.numpy() for i, v in enumerate(trainer.model.trainable_weights)},
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
