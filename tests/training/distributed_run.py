"""Runs the replica-invariance Trainer under a strategy in its own process
(tests/training/test_distributed.py).

    python tests/training/distributed_run.py STRATEGY OUT_NPZ TRAIN_PATTERN
STRATEGY: default | multi_worker (TF_CONFIG from the env).
Writes the per-step losses and the final weights to OUT_NPZ.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def main(strategy_name: str, out: str, pattern: str):
    from spinenet_tf.training.trainer import Trainer
    from tests.conftest import replica_invariance_config

    if strategy_name == "multi_worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()
    config = replica_invariance_config(pattern)
    trainer = Trainer(
        config, os.path.join(os.path.dirname(out), "model_" + strategy_name), strategy
    )
    trainer.train()
    np.savez(
        out, losses=np.array([h["total_loss"] for h in trainer.history]), **weights(trainer.model)
    )


def weights(model) -> dict:
    return {v.path: v.numpy() for v in model.weights}


if __name__ == "__main__":
    main(*sys.argv[1:])
