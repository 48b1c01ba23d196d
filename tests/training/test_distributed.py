"""The same run on 1 or 2 replicas: MirroredStrategy over 2 logical CPUs (in-process) and
MultiWorkerMirroredStrategy over two worker processes on 127.0.0.1."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from spinenet_tf.training.trainer import Trainer
from tests.conftest import replica_invariance_config

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("distributed_run.py")


def _train(strategy, pattern, model_dir):
    trainer = Trainer(replica_invariance_config(pattern), str(model_dir), strategy)
    trainer.train()
    losses = np.array([h["total_loss"] for h in trainer.history])
    return trainer, losses, {v.path: v.numpy() for v in trainer.model.weights}


def assert_same_run(losses, weights, ref_losses, ref_weights):
    """Per-step losses within 1e-5 relative, every variable (moving statistics included)
    within 1e-4 of the largest weight."""
    assert len(losses) == len(ref_losses) == 10
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert weights.keys() == ref_weights.keys()
    scale = max(float(np.max(np.abs(w))) for w in ref_weights.values())
    drift = {k: float(np.max(np.abs(weights[k] - ref_weights[k]))) for k in ref_weights}
    worst = max(drift, key=drift.get)
    assert drift[worst] < 1e-4 * scale, (worst, drift[worst], scale)


@pytest.fixture(scope="module")
def one_replica(shapes_records, tmp_path_factory):
    _, losses, weights = _train(
        tf.distribute.get_strategy(), shapes_records["train"], tmp_path_factory.mktemp("one")
    )
    return losses, weights


def test_mirrored_two_replicas_train_like_one(one_replica, mirrored, shapes_records, tmp_path):
    trainer, losses, weights = _train(mirrored, shapes_records["train"], tmp_path)
    assert_same_run(losses, weights, *one_replica)
    # Every replica's copy of every variable is the same.
    for v in trainer.model.weights:
        copies = mirrored.experimental_local_results(v.value)
        for copy in copies[1:]:
            np.testing.assert_array_equal(copy.numpy(), copies[0].numpy(), err_msg=v.path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two worker processes: about 2 minutes
def test_multi_worker_trains_like_one_replica(one_replica, shapes_records, tmp_path):
    workers = [f"127.0.0.1:{_free_port()}" for _ in range(2)]
    procs = []
    for i in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}
        env = dict(
            os.environ,
            PYTHONPATH=str(ROOT),
            TF_CPP_MIN_LOG_LEVEL="2",
            TF_CONFIG=json.dumps(tf_config),
        )
        args = [sys.executable, str(SCRIPT), "multi_worker", str(tmp_path / f"worker{i}.npz")]
        procs.append(
            subprocess.Popen(
                [*args, shapes_records["train"]],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
    runs = [dict(np.load(tmp_path / f"worker{i}.npz")) for i in range(2)]
    for run in runs:
        losses = run.pop("losses")
        assert_same_run(losses, run, *one_replica)
    # Only the chief keeps checkpoints.
    assert (tmp_path / "model_multi_worker" / "checkpoint").exists()
