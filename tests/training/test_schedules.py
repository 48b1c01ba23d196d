"""Learning-rate schedules: warm-up, step and cosine decay."""

import numpy as np
import pytest

from spinenet_tf.training import schedules


def test_warmup_step_and_cosine_schedules():
    step = schedules.WarmupSchedule(1.0, 100, 10, 0.1, "step", (0.5, 0.9), (0.1, 0.01))
    values = [float(step(s)) for s in (0, 5, 10, 49, 50, 89, 90, 99)]
    np.testing.assert_allclose(values, [0.1, 0.55, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01], rtol=1e-6)
    cosine = schedules.WarmupSchedule(1.0, 110, 10, 0.0, "cosine")
    np.testing.assert_allclose(
        [float(cosine(s)) for s in (5, 10, 60, 110)], [0.5, 1.0, 0.5, 0.0], atol=1e-6
    )
    assert schedules.WarmupSchedule.from_config(step.get_config()).get_config() == step.get_config()
    with pytest.raises(ValueError, match="unknown decay 'linear'"):
        schedules.WarmupSchedule(1.0, 10, decay="linear")
