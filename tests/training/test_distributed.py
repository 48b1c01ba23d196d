"""The trainer under MirroredStrategy (2 logical CPUs) and MultiWorkerMirroredStrategy (two
worker processes on 127.0.0.1), each in its own process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("distributed_run.py")


def _env(**extra):
    return dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2", **extra)


def _start(strategy, out, pattern, **env):
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), strategy, str(out), pattern],
        env=_env(**env),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc):
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def test_mirrored_matches_default_strategy(shapes_records, tmp_path):
    """Same global batch of 4, as one replica or as two replicas of 2 with synchronised batch
    norm, the loss normalised by the global batch's positives. Measured: the first two
    losses agree to 1e-6, the third to 1e-3, and the weights after three steps differ by up
    to 2.3% of the largest weight. Where the third step's difference comes from is not
    pinned down yet (the optimizer alone matches exactly under MirroredStrategy)."""
    procs = [
        _start(name, tmp_path / f"{name}.npz", shapes_records["train"])
        for name in ("default", "mirrored2")
    ]
    for p in procs:
        _finish(p)
    single = np.load(tmp_path / "default.npz")
    mirrored = np.load(tmp_path / "mirrored2.npz")
    np.testing.assert_allclose(mirrored["losses"][:2], single["losses"][:2], rtol=1e-5)
    np.testing.assert_allclose(mirrored["losses"], single["losses"], rtol=2e-3)
    weights = [k for k in single.files if k != "losses"]
    scale = max(float(np.max(np.abs(single[k]))) for k in weights)
    drift = max(float(np.max(np.abs(mirrored[k] - single[k]))) for k in weights)
    assert drift < 0.05 * scale


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two worker processes: about 90 s
def test_multi_worker_trains_and_workers_agree(shapes_records, tmp_path):
    workers = [f"127.0.0.1:{_free_port()}" for _ in range(2)]
    procs = []
    for i in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}
        procs.append(
            _start(
                "multi_worker",
                tmp_path / f"worker{i}.npz",
                shapes_records["train"],
                TF_CONFIG=json.dumps(tf_config),
            )
        )
    for p in procs:
        _finish(p)
    a, b = np.load(tmp_path / "worker0.npz"), np.load(tmp_path / "worker1.npz")
    assert np.isfinite(a["losses"]).all()
    for k in a.files:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)
    # Only the chief keeps checkpoints.
    assert (tmp_path / "model_multi_worker" / "checkpoint").exists()
    assert not (tmp_path / "model_multi_worker" / "workers").exists()
