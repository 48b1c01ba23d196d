"""Shared fixtures: tiny models, Model Garden import, quiet TF logs."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Width-reduced models that build in about a second: tests check wiring, not capacity.
TINY = dict(filter_size_scale=0.25, endpoints_num_filters=16)
TINY_MOBILE = dict(filter_size_scale=0.5, endpoints_num_filters=8)


@pytest.fixture(autouse=True)
def _float32_policy():
    """Every test starts and ends with the default dtype policy."""
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")


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
