"""The task interface's shared pieces: one route for each model setting."""

import pytest

from spinenet_tf.tasks import RetinaNetTask, model_settings
from spinenet_tf.training.config import ExperimentConfig
from tests.conftest import TINY


def test_model_settings_carry_the_overrides_and_the_batch_norm_mode():
    config = ExperimentConfig(model_overrides=dict(TINY), sync_batch_norm=False)
    assert model_settings(config) == {**TINY, "use_sync_bn": False}


@pytest.mark.parametrize(
    ("key", "route"),
    [("use_sync_bn", "sync_batch_norm"), ("image_size", "image_size")],
)
def test_a_setting_with_its_own_field_is_refused_as_an_override(key, route):
    """sync_batch_norm used to be silently beaten by a use_sync_bn override."""
    config = ExperimentConfig(model_overrides={key: 1}, image_size=64)
    with pytest.raises(ValueError, match=rf"\['{key}'\] \({key}: set ExperimentConfig.{route}"):
        RetinaNetTask().build_model(config)
