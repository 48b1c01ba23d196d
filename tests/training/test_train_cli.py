"""python -m spinenet_tf.train: flags, gin errors, train_and_eval end to end, kill and resume,
SIGTERM, and every experiment's gin file."""

import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from spinenet_tf.tasks import ClassificationTask, MaskRCNNTask, RetinaNetTask
from spinenet_tf.training import gin_bindings
from tests.conftest import (
    HEAVY_MEMORY,
    MASKRCNN_AT_64,
    TINY_DETECTOR,
    TINY_MASKRCNN_HEADS,
    tiny_experiment,
)

ROOT = Path(__file__).resolve().parents[2]
TINY_PARAMS = [
    "ExperimentConfig.image_size = 64",
    f"ExperimentConfig.model_overrides = {TINY_DETECTOR!r}",
    "ExperimentConfig.synthetic_data_args = {'num_train': 16, 'num_val': 4, 'image_size': 64}",
    "train/DataConfig.global_batch_size = 4",
    "eval/DataConfig.global_batch_size = 4",
    "ExperimentConfig.steps_per_loop = 1",
    "ExperimentConfig.checkpoint_every = 2",
    "ExperimentConfig.num_vis_images = 1",
    "ExperimentConfig.deterministic = True",
]


def _command(model_dir, data_dir, train_steps=6, mode="train_and_eval", extra=()):
    params = TINY_PARAMS + [
        f"ExperimentConfig.synthetic_data_dir = '{data_dir}'",
        f"ExperimentConfig.train_steps = {train_steps}",
        *extra,
    ]
    return [
        sys.executable,
        "-m",
        "spinenet_tf.train",
        f"--gin_file={ROOT / 'gin_configs/experiments/quickstart.gin'}",
        *(f"--gin_param={p}" for p in params),
        f"--model_dir={model_dir}",
        f"--mode={mode}",
    ]


def _run(cmd, **kwargs):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, **kwargs)


def test_bad_flags_and_unknown_gin_bindings_are_named(tmp_path):
    result = _run([sys.executable, "-m", "spinenet_tf.train", "--model_dir=x", "--mode=fit"])
    assert result.returncode != 0 and "mode" in result.stderr and "fit" in result.stderr
    result = _run(_command(tmp_path, tmp_path, extra=["ExperimentConfig.image_sise = 3"]))
    assert result.returncode != 0
    assert "image_sise" in result.stderr and "gin configuration" in result.stderr
    assert not (tmp_path / "checkpoint").exists()


def _weights(model_dir):
    reader = tf.train.load_checkpoint(str(model_dir))
    names = [n for n in reader.get_variable_to_shape_map() if n.startswith("model/")]
    return {n: reader.get_tensor(n) for n in names}


@pytest.mark.slow  # two training processes; in-process resume is in test_trainer.py
def test_killed_training_resumes_to_the_same_weights(tmp_path):
    """SIGKILL mid-run, restart: the run reaches the final step with the weights of an
    uninterrupted run (deterministic mode replays the input up to the restored step)."""
    data = tmp_path / "shapes"
    whole = _run(_command(tmp_path / "whole", data, mode="train"), timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]

    cmd = _command(tmp_path / "killed", data, mode="train")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while tf.train.latest_checkpoint(tmp_path / "killed") is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = tf.train.latest_checkpoint(tmp_path / "killed")
    assert killed_at is not None and not killed_at.endswith("ckpt-6")

    resumed = _run(cmd, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert tf.train.latest_checkpoint(tmp_path / "killed").endswith("ckpt-6")
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "killed")
    assert a.keys() == b.keys() and len(a) > 100
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_train_and_eval_end_to_end(tmp_path):
    result = _run(_command(tmp_path / "run", tmp_path / "shapes", train_steps=2), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "AP50=" in result.stdout
    run = tmp_path / "run"
    assert (run / "config.gin").read_text().count("ExperimentConfig") > 3
    assert "ExperimentConfig.model_id" in (run / "operative_config.gin").read_text()
    assert (run / "eval_2.json").exists() and (run / "detections_2.json").exists()
    assert list((run / "images").glob("*.png"))
    assert (tmp_path / "shapes" / "records" / "DONE").exists()
    # The printed export command pastes back into a shell with every binding intact, quotes
    # included (TINY_PARAMS hold single quotes, the data dir a path).
    lines = result.stdout.split("Next:\n", 1)[1].splitlines()
    export = shlex.split(" ".join(line.rstrip("\\") for line in lines[:2]))
    assert export[0] == "export:" and export[2:4] == ["-m", "spinenet_tf.export"]
    cmd = _command(run, tmp_path / "shapes", train_steps=2)
    assert [a for a in export if a.startswith("--gin")] == [a for a in cmd if a.startswith("--gin")]
    assert f"--checkpoint={run}" in export


def test_sigterm_saves_and_stops(shapes_records, shapes_dir, tmp_path):
    from spinenet_tf.training.trainer import Trainer

    config = tiny_experiment(shapes_records, shapes_dir, train_steps=50, steps_per_loop=1)
    trainer = Trainer(config, tmp_path / "term")

    def send_when_first_checkpoint_exists():
        while tf.train.latest_checkpoint(tmp_path / "term") is None:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send_when_first_checkpoint_exists, daemon=True).start()
    trainer.train()
    assert 2 <= trainer.step < 50
    assert tf.train.latest_checkpoint(tmp_path / "term").endswith(f"ckpt-{trainer.step}")


@pytest.mark.parametrize(
    "experiment", sorted(p.name for p in (ROOT / "gin_configs/experiments").glob("*.gin"))
)
@pytest.mark.parametrize("runtime", ["tpu.gin", "gpu.gin", "cpu.gin"])
def test_every_experiment_parses(experiment, runtime):
    import gin

    gin.clear_config()
    try:
        gin_bindings.parse(
            [
                ROOT / "gin_configs/experiments" / experiment,
                ROOT / "gin_configs/runtime" / runtime,
            ],
            [],
        )
        config = gin_bindings.experiment_config()
    finally:
        gin.clear_config()
    assert config.train_steps > 0 and config.image_size >= 96
    if "classification" in experiment:
        assert isinstance(config.task, ClassificationTask)
    elif "maskrcnn" in experiment:
        assert isinstance(config.task, MaskRCNNTask)
    else:
        assert type(config.task) is RetinaNetTask
    if experiment.startswith("maskrcnn_"):  # tensorflow/tpu's recipes
        assert config.optimizer.warmup_steps == 2000 and config.optimizer.decay == "step"
        # The first steps past the boundaries are tensorflow/tpu's.
        first = [math.ceil(b * config.train_steps) for b in config.optimizer.boundaries]
        assert first == ([173530, 182910] if "190" in experiment else [148160, 157420])
    if experiment.endswith("_imagenet.gin"):  # tensorflow/tpu's recipe
        assert (config.num_classes, config.image_size) == (1001, 224)
        assert config.train.global_batch_size == 4096 and config.train_steps == 62557
        assert config.optimizer.learning_rate * 4096 / 256 == pytest.approx(1.6)
        assert config.optimizer.decay == "cosine" and config.optimizer.warmup_steps == 1564
    if "coco" in experiment:
        assert config.train.global_batch_size == 256
        jitter = (0.1, 2.0) if experiment == "maskrcnn_spinenet190_coco.gin" else (0.5, 2.0)
        assert config.train.scale_range == jitter
        assert config.optimizer.learning_rate == 0.28


def _tiny_experiment(experiment: str, records, runtime: str = "cpu.gin"):
    import gin

    gin.clear_config()
    try:
        gin_bindings.parse(
            [ROOT / "gin_configs/experiments" / experiment, ROOT / "gin_configs/runtime" / runtime],
            [],
        )
        config = gin_bindings.experiment_config()
    finally:
        gin.clear_config()
    import dataclasses

    from spinenet_tf.specs import get_scaling

    mobile = get_scaling(config.model_id).family == "mobile"
    tiny = (
        {"filter_size_scale": 0.5, "endpoints_num_filters": 8}
        if mobile
        else {"filter_size_scale": 0.25, "endpoints_num_filters": 16}
    )
    if isinstance(config.task, MaskRCNNTask):
        tiny.update(TINY_MASKRCNN_HEADS, **MASKRCNN_AT_64)
    elif isinstance(config.task, RetinaNetTask):
        tiny.update(
            {"head_num_convs": 1} if mobile else {"head_num_convs": 1, "head_num_filters": 16}
        )
    return dataclasses.replace(
        config,
        image_size=64,
        num_classes=config.num_classes or 5,
        model_overrides={**config.model_overrides, **tiny},
        train=dataclasses.replace(
            config.train, source=records["train"], global_batch_size=2, shuffle_buffer=0
        ),
        synthetic_data_dir="",
        train_steps=1,
        steps_per_loop=1,
        jit_compile=True,
    )


def _xla_cases():
    # Slow (about 2 minutes each), and at most one at a time: 12-15 GB resident each.
    heavy = [pytest.mark.slow, HEAVY_MEMORY]
    cases = [pytest.param("quickstart.gin", "cpu.gin", id="quickstart", marks=heavy)]
    for path in sorted((ROOT / "gin_configs/experiments").glob("*_coco.gin")):
        cases.append(pytest.param(path.name, "tpu.gin", id=path.stem, marks=heavy))
    for path in sorted((ROOT / "gin_configs/experiments").glob("classification_*.gin")):
        cases.append(pytest.param(path.name, "tpu.gin", id=path.stem, marks=heavy))
    return cases


@pytest.mark.parametrize("experiment, runtime", _xla_cases())
def test_experiment_train_step_compiles_with_xla(
    experiment, runtime, shapes_records, classification_data, tmp_path
):
    """Every experiment's model, at tiny width and 64 px, takes an XLA-compiled training step
    (the COCO and ImageNet experiments with the TPU runtime: mixed_bfloat16 and sync batch
    norm)."""
    from spinenet_tf.training.trainer import Trainer

    records = classification_data if "classification" in experiment else shapes_records
    config = _tiny_experiment(experiment, records, runtime)
    trainer = Trainer(config, tmp_path / "xla")
    losses = trainer.train()
    assert trainer.step == 1 and np.isfinite(losses["total_loss"])
