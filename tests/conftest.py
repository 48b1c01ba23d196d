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
