"""Shared fixtures: tiny models, Model Garden import, quiet TF logs."""

import ctypes
import gc
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.python.framework import config as tf_config  # noqa: E402

# Two logical CPUs, so that MirroredStrategy tests run in-process: 1 vs 2 replicas.
_CPU = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_CPU, [tf.config.LogicalDeviceConfiguration()] * 2)


@pytest.fixture(scope="session")
def mirrored():
    """MirroredStrategy over the two logical CPUs. One per process: two instances' collective
    ops share instance keys and fail with shape mismatches."""
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


# Width-reduced models that build in about a second: tests check wiring, not capacity.
TINY = dict(filter_size_scale=0.25, endpoints_num_filters=16)
TINY_MOBILE = dict(filter_size_scale=0.5, endpoints_num_filters=8)
# A small user-defined block list (levels 3-5) for custom-spec tests.
CUSTOM_SPECS = [
    (3, "bottleneck", (0, 1), False),
    (5, "residual", (1, 2), False),
    (4, "bottleneck", (2, 3), True),
    (3, "residual", (3, 4), True),
    (5, "bottleneck", (2, 5), True),
]
# Tests that hold 8-15 GB: `make test-slow` runs them after the others, alone, each in a
# process of its own (two at once, or one on top of a worker's leftovers, exhausted 24 GiB).
HEAVY_MEMORY = pytest.mark.memory
# Full-size builds of these take 15-20 s each: their sweeps run in the slow suite.
LARGE_IDS = ("143", "143L", "190")
# A tiny model's levels and blocks for tests that train, export or fit: five blocks trace in
# a third of the time of 49S's fifteen, and every level of the list is an output.
FIVE_BLOCKS = dict(block_specs=CUSTOM_SPECS, min_level=3, max_level=5)
# The tiny detector of the tests that train, fit or export RetinaNet: five blocks, a
# one-conv head of 16 filters.
TINY_DETECTOR = dict(TINY, head_num_filters=16, head_num_convs=1, **FIVE_BLOCKS)
# A tiny Mask R-CNN: five blocks (levels 3-5), 16-filter heads of one conv.
TINY_MASKRCNN_HEADS = dict(
    rpn_num_filters=16,
    head_num_convs=1,
    head_num_filters=16,
    head_fc_dims=32,
    mask_num_convs=1,
    mask_num_filters=16,
)
TINY_MASKRCNN = dict(TINY, **FIVE_BLOCKS, **TINY_MASKRCNN_HEADS, seed=1)
# Mask R-CNN at 64 px has fewer anchors (252 on levels 3-5) than the 256 the RPN samples:
# fewer samples and proposals for tests at that size.
MASKRCNN_AT_64 = dict(
    rpn_targets={"num_samples": 64},
    sampler={"num_samples": 64, "num_masks": 16},
    proposal={"pre_nms_top_k": 200, "test_pre_nms_top_k": 100, "num_proposals": 100},
)


# The start of a script run as a consumer with TensorFlow only: keras, tf_keras and
# spinenet_tf behave as if not installed (found without an origin, which TensorFlow's lazy
# loaders treat as absent; importing fails).
TENSORFLOW_ONLY = """
import importlib.abc, importlib.machinery, sys
BLOCKED = ("keras", "tf_keras", "spinenet_tf")
class Missing(importlib.abc.Loader):
    def create_module(self, spec):
        raise ImportError(f"No module named {spec.name!r} (blocked in this test)")
    def exec_module(self, module):
        pass
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, Missing())
sys.meta_path.insert(0, Block())
"""


def run_tensorflow_only(script: str, tmp_path, *args) -> dict:
    """Runs TENSORFLOW_ONLY + script (which writes JSON to its last argument) in a fresh
    process; returns that JSON."""
    import json
    import subprocess
    import sys

    path, out = tmp_path / "consumer.py", tmp_path / "consumer_out.json"
    path.write_text(TENSORFLOW_ONLY + script)
    result = subprocess.run(
        [sys.executable, str(path), *map(str, args), str(out)],
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


# The suite runs on two workers (pytest.ini: -n 2), which take tests in collection order:
# costliest modules first (longest-processing-time scheduling), so that the two workers end
# together instead of one idling while the other runs a minute-long test collected last.
# Seconds per module measured on 2 cores (2026-12-07); unlisted modules, each under about
# 20 s, follow in collection order.
COSTLIEST_FIRST = (
    "tests/models/test_retinanet.py",  # 140: XLA under mixed bfloat16
    "tests/serving/test_tflite.py",  # 92
    "tests/tasks/test_maskrcnn.py",  # about 90 (new; measured under load)
    "tests/tasks/test_classification.py",  # 65
    "tests/training/test_distributed.py",  # 62
    "tests/convert/test_model_garden.py",  # 61
    "tests/models/test_spinenet.py",  # 55
    "tests/training/test_train_cli.py",  # 50
    "tests/models/test_classifier.py",  # 41
    "tests/models/test_maskrcnn.py",  # 37
    "tests/training/test_trainer.py",  # 34
    "tests/training/test_model_garden_training.py",  # 31
    "tests/test_custom_data.py",  # 30
    "tests/data/test_pipeline.py",  # 29
    "tests/serving/test_cli.py",  # 27
    "tests/serving/test_export.py",  # 25
    "tests/tools/test_summary.py",  # 22
    "tests/training/test_user_task.py",  # 19
)


def pytest_collection_modifyitems(items):
    rank = {module: i for i, module in enumerate(COSTLIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


@pytest.fixture(autouse=True)
def _float32_policy():
    """Every test starts and ends with the default dtype policy, and with every random
    generator (Python, NumPy, TensorFlow, Keras) seeded: weights drawn by initialisers, ours
    and Model Garden's, are the same in every run. TF op determinism, which a deterministic
    Trainer turns on for its whole process, is off again after each test: XLA has no
    deterministic MaxPool gradient, so a later XLA test in the same worker would fail."""
    keras.utils.set_random_seed(0)
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")
    if tf_config.is_op_determinism_enabled():
        tf_config.disable_op_determinism()


@pytest.fixture(autouse=True)
def _free_memory_after_slow_tests(request):
    """A pytest worker runs many slow tests; without this, what each leaves behind (Keras
    state, kernel caches, freed but unreturned heap) piled up to 11-13 GB per worker and two
    workers exhausted 24 GiB. After each slow test: Keras' session cleared, garbage
    collected, the heap trimmed back to the OS."""
    yield
    if request.node.get_closest_marker("slow") is None:
        return
    keras.backend.clear_session(free_memory=True)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def model_garden():
    """Skips the test when the `modelgarden` extra is not installed."""
    return pytest.importorskip("official.vision.modeling.backbones.spinenet")


def randomize_batch_norm_stats(model, rng):
    """Non-trivial BN statistics so a parity test cannot pass on identity batch norms."""
    for v in model.variables:
        name = v.name
        if "moving_variance" in name:
            v.assign(rng.uniform(0.5, 2.0, v.shape).astype("float32"))
        elif "moving_mean" in name or "beta" in name:
            v.assign(rng.normal(0.0, 0.2, v.shape).astype("float32"))
        elif "gamma" in name:
            v.assign(rng.uniform(0.5, 1.5, v.shape).astype("float32"))


def relative_max_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A small synthetic shapes dataset (COCO JSON + JPEGs), made once per session."""
    from spinenet_tf.data import shapes

    root = tmp_path_factory.mktemp("shapes")
    shapes.generate(root, num_train=24, num_val=8, image_size=64, seed=3)
    return root


@pytest.fixture(scope="session")
def shapes_records(shapes_dir):
    """The shapes data as TFRecords with masks: {"train": pattern, "val": pattern}."""
    from spinenet_tf.data import create_coco_tfrecord, shapes

    out = {}
    for split in shapes.SPLITS:
        prefix = str(shapes_dir / "records" / split)
        create_coco_tfrecord.convert(
            shapes.image_dir(shapes_dir, split),
            shapes.annotation_path(shapes_dir, split),
            prefix,
            num_shards=2,
            include_masks=True,
            num_workers=0,
            verbose=False,
        )
        out[split] = prefix + "-*.tfrecord"
    return out


@pytest.fixture(scope="session")
def classification_data(tmp_path_factory):
    """The shapes classification data, small: 24 training and 10 held-out images of 48 px
    or less, as TFRecords with label maps ({"train", "val", "label_map", "images"})."""
    from spinenet_tf.data import shapes_classification

    return shapes_classification.ensure_dataset(
        tmp_path_factory.mktemp("shapes_cls"),
        num_train=24,
        num_val=10,
        image_size=48,
        seed=3,
        num_shards=2,
    )


def tiny_experiment(records, shapes_dir, **overrides):
    """A 4-step RetinaNet experiment on the shapes records, tiny model, evaluation on."""
    from spinenet_tf.data import shapes
    from spinenet_tf.training.config import DataConfig, ExperimentConfig, OptimizerConfig

    base = dict(
        model_id="49S",
        num_classes=5,
        image_size=64,
        model_overrides=TINY_DETECTOR,
        train=DataConfig(source=records["train"], global_batch_size=4, scale_range=(0.8, 1.2)),
        eval=DataConfig(
            source=records["val"],
            global_batch_size=4,
            annotation_file=str(shapes.annotation_path(shapes_dir, "val")),
        ),
        optimizer=OptimizerConfig(learning_rate=0.64, warmup_steps=2),
        train_steps=4,
        steps_per_loop=2,
        checkpoint_every=2,
        seed=1,
    )
    base.update(overrides)
    return ExperimentConfig(**base)


def replica_invariance_config(train_pattern: str):
    """A tiny, well-conditioned training run for comparing replica counts: 10 steps of
    global batch 4 at 256 px, warm-up, momentum, weight decay, clipping and synchronised
    batch norm on, stochastic depth off, deterministic input. At 64-128 px the level-6/7
    maps are 1x1-2x2 and a 1e-7 perturbation of the weights grows to 1e-2 of the loss
    within 6 steps on one replica alone, so no two float orders could agree there."""
    from spinenet_tf.training.trainer import DataConfig, ExperimentConfig, OptimizerConfig

    return ExperimentConfig(
        model_id="49S",
        num_classes=5,
        image_size=256,
        model_overrides=TINY_DETECTOR,
        train=DataConfig(source=train_pattern, global_batch_size=4, shuffle_buffer=0),
        optimizer=OptimizerConfig(learning_rate=0.064, warmup_steps=4, global_clipnorm=0.5),
        train_steps=10,
        steps_per_loop=1,
        checkpoint_every=10,
        sync_batch_norm=True,
        seed=1,
        deterministic=True,
    )
