import keras
import numpy as np
import pytest
import tensorflow as tf

import spinenet_tf
from spinenet_tf.models.spinenet import SpineNet
from spinenet_tf.tools.summary import count_parameters
from tests.conftest import CUSTOM_SPECS, LARGE_IDS, TINY, TINY_MOBILE

# Model Garden 2.20's trainable parameter counts (../shared/REFERENCE.md; re-measured in
# tests/convert against a live Model Garden build).
MODEL_GARDEN_PARAMS = {
    "49S": 9_089_215,
    "49": 21_831_488,
    "96": 36_262_976,
    "143": 60_247_616,
    "143L": 100_796_257,
    "190": 126_587_664,
    "mobile-49XS": 842_456,
    "mobile-49S": 975_678,
    "mobile-49": 2_268_708,
}


@pytest.mark.parametrize(
    "model_id",
    # The largest ids take 15-20 s each to build: counted in the slow suite.
    [pytest.param(m, marks=pytest.mark.slow) if m in LARGE_IDS else m for m in MODEL_GARDEN_PARAMS],
)
def test_parameter_counts_equal_model_garden(model_id):
    model = spinenet_tf.build_backbone(model_id)
    assert count_parameters(model) == MODEL_GARDEN_PARAMS[model_id]


def test_all_variable_count_of_49_includes_batch_norm_statistics():
    model = spinenet_tf.build_backbone("49")
    assert model.count_params() == 21_920_192


@pytest.mark.parametrize("model_id, tiny", [("49S", TINY), ("mobile-49S", TINY_MOBILE)])
def test_any_input_size_gives_ceil_level_sizes(model_id, tiny):
    model = spinenet_tf.build_backbone(model_id, **tiny)  # one model, any size
    for hw in [(224, 224), (512, 384), (333, 500), (129, 65)]:
        out = model(np.zeros((1, *hw, 3), "float32"))
        assert sorted(out) == ["P3", "P4", "P5", "P6", "P7"]
        for level in range(3, 8):
            stride = 2**level
            expected = (1, -(-hw[0] // stride), -(-hw[1] // stride), tiny["endpoints_num_filters"])
            assert tuple(out[f"P{level}"].shape) == expected, (hw, level)


def test_static_input_shape_is_reflected_in_outputs():
    model = spinenet_tf.build_backbone("49S", input_shape=(224, 160, 3), **TINY)
    assert tuple(model.output["P7"].shape) == (None, 2, 2, 16)


def test_min_and_max_level_overrides():
    model = spinenet_tf.build_backbone("49S", min_level=2, max_level=5, **TINY)
    out = model(np.zeros((1, 64, 64, 3), "float32"))
    assert sorted(out) == ["P2", "P3", "P4", "P5"]
    assert tuple(out["P2"].shape) == (1, 16, 16, 16)
    with pytest.raises(ValueError, match=r"levels \[2\] have no output block.*\[3, 4, 5, 6, 7\]"):
        spinenet_tf.build_backbone("mobile-49", min_level=2)


def test_unknown_overrides_and_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"unknown override\(s\) \['filters'\]"):
        spinenet_tf.build_backbone("49", filters=3)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        spinenet_tf.build_backbone("49", activation="gelu")
    with pytest.raises(ValueError, match="unknown model_id"):
        spinenet_tf.build_backbone("50")


def test_user_block_specs_build_and_invalid_ones_are_rejected():
    model = spinenet_tf.build_backbone(
        "49S", block_specs=CUSTOM_SPECS, min_level=3, max_level=5, **TINY
    )
    out = model(np.zeros((1, 96, 96, 3), "float32"))
    assert [tuple(out[k].shape) for k in sorted(out)] == [
        (1, 12, 12, 16),
        (1, 6, 6, 16),
        (1, 3, 3, 16),
    ]
    bad = CUSTOM_SPECS[:2] + [(4, "bottleneck", (2, 9), True)]
    with pytest.raises(ValueError, match="block spec 2 .*input offset 9 does not exist yet"):
        spinenet_tf.build_backbone("49S", block_specs=bad, **TINY)


def _assert_same_outputs(a, b, x):
    ya, yb = a(x), b(x)
    for key in ya:
        np.testing.assert_allclose(ya[key], yb[key], rtol=1e-5, atol=1e-5)


def test_config_round_trip_keeps_block_specs_and_every_argument():
    model = spinenet_tf.build_backbone(
        "49S",
        block_specs=CUSTOM_SPECS,
        min_level=3,
        max_level=5,
        activation="relu",
        weighted_fusion=True,
        init_stochastic_depth_rate=0.1,
        kernel_regularizer=keras.regularizers.L2(4e-5),
        norm_epsilon=1e-4,
        **TINY,
    )
    config = model.get_config()
    assert config["block_specs"] == [list(s[:2]) + [list(s[2]), s[3]] for s in CUSTOM_SPECS]
    clone = SpineNet.from_config(config)
    assert clone.get_config() == config
    clone.set_weights(model.get_weights())
    _assert_same_outputs(model, clone, np.random.default_rng(1).random((1, 64, 64, 3), "float32"))


def test_keras_save_and_load(tmp_path):
    model = spinenet_tf.build_backbone("mobile-49XS", weighted_fusion=True, **TINY_MOBILE)
    path = tmp_path / "backbone.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, SpineNet)
    _assert_same_outputs(model, loaded, np.random.default_rng(2).random((2, 64, 96, 3), "float32"))


def test_tf_checkpoint_round_trip(tmp_path):
    model = spinenet_tf.build_backbone("49S", **TINY)
    prefix = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    other = spinenet_tf.build_backbone("49S", **TINY)
    tf.train.Checkpoint(model=other).restore(prefix).assert_existing_objects_matched()
    _assert_same_outputs(model, other, np.random.default_rng(3).random((1, 64, 64, 3), "float32"))


def _train_step_fn(model, optimizer):
    def step(images):
        with tf.GradientTape() as tape:
            out = model(images, training=True)
            loss = tf.add_n([tf.reduce_mean(tf.cast(v, tf.float32) ** 2) for v in out.values()])
            loss += tf.add_n(model.losses) if model.losses else 0.0
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    return step


@pytest.mark.slow  # 2-3 minutes each; the RetinaNet and trainer XLA tests compile it too
@pytest.mark.parametrize("model_id, tiny", [("49S", TINY), ("mobile-49XS", TINY_MOBILE)])
def test_mixed_bfloat16_train_step_compiles_with_xla(model_id, tiny):
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = spinenet_tf.build_backbone(
        model_id,
        weighted_fusion=True,
        init_stochastic_depth_rate=0.2,
        kernel_regularizer=keras.regularizers.L2(4e-5),
        **tiny,
    )
    assert all(v.dtype == "float32" for v in model.weights)
    out = model(np.zeros((1, 64, 64, 3), "float32"))
    assert all(v.dtype == tf.bfloat16 for v in out.values())
    fusion = [v for v in model.trainable_variables if "fusion_weights" in v.path]
    assert fusion, "weighted fusion must create weights"
    before = [np.array(v) for v in fusion]
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    step = tf.function(_train_step_fn(model, optimizer), jit_compile=True)
    images = tf.random.uniform((2, 96, 64, 3))
    losses = [float(step(images)) for _ in range(2)]
    assert np.all(np.isfinite(losses))
    # The fusion weights are trained, not dead parameters.
    assert any(not np.allclose(b, np.array(v)) for b, v in zip(before, fusion, strict=True))


def test_stochastic_depth_rate_rises_with_block_index():
    model = spinenet_tf.build_backbone("49S", init_stochastic_depth_rate=0.2, **TINY)
    rates = [model.get_layer(f"block{i}_0").stochastic_depth_rate for i in range(15)]
    np.testing.assert_allclose(rates, [0.2 * (i + 1) / 16 for i in range(15)])
