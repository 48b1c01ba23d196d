import keras
import numpy as np
import pytest
import tensorflow as tf

import spinenet_tf
from spinenet_tf.models.retinanet import RetinaNet, build_retinanet
from spinenet_tf.ops.targets import LossConfig, MatchingConfig
from spinenet_tf.tools.summary import count_parameters
from tests.conftest import CUSTOM_SPECS, LARGE_IDS, TINY, TINY_MOBILE

# Model Garden 2.20 RetinaNet-SpineNet, 91 classes (../shared/REFERENCE.md).
MODEL_GARDEN_PARAMS = {
    "49S": 11_265_942,
    "49": 28_543_383,
    "96": 42_974_871,
    "143": 66_959_511,
    "190": 163_637_351,
    "mobile-49XS": 872_711,
    "mobile-49S": 1_030_653,
    "mobile-49": 2_337_579,
}
TINY_HEAD = dict(head_num_filters=16, head_num_convs=2)


@pytest.mark.parametrize(
    "model_id",
    # The largest ids take 15-20 s each to build: counted in the slow suite.
    [pytest.param(m, marks=pytest.mark.slow) if m in LARGE_IDS else m for m in MODEL_GARDEN_PARAMS],
)
def test_parameter_counts_equal_model_garden(model_id):
    # Parameters do not depend on the image size; a small one builds faster.
    model = build_retinanet(model_id, num_classes=91, image_size=128)
    assert count_parameters(model) == MODEL_GARDEN_PARAMS[model_id]


def _tiny(model_id="49S", image_size=128, **kwargs):
    tiny = TINY_MOBILE if model_id.startswith("mobile") else TINY
    return build_retinanet(
        model_id, num_classes=4, image_size=image_size, **{**tiny, **TINY_HEAD, **kwargs}
    )


def _ground_truth(batch=2):
    boxes = np.zeros((batch, 3, 4), np.float32)
    classes = np.full((batch, 3), -1, np.int32)
    boxes[:, 0], classes[:, 0] = [16, 16, 80, 64], 1
    boxes[:, 1], classes[:, 1] = [60, 70, 120, 126], 3
    return {"boxes": boxes, "classes": classes}


def test_outputs_cover_every_anchor_and_predict_decodes():
    model = _tiny(image_size=(128, 96))
    n = model.anchor_config.num_anchors((128, 96))
    images = np.random.default_rng(0).uniform(0, 255, (2, 128, 96, 3)).astype("float32")
    out = model(images)
    assert tuple(out["class_logits"].shape) == (2, n, 4)
    assert tuple(out["box_deltas"].shape) == (2, n, 4)
    det = model.predict(images, verbose=0)
    assert {k: v.shape for k, v in det.items()} == {
        "boxes": (2, 100, 4),
        "scores": (2, 100),
        "classes": (2, 100),
        "num_detections": (2,),
    }


@pytest.mark.slow  # two fits; tests/data's model.fit on make_dataset is the smoke test
def test_fit_learns_from_raw_ground_truth_and_from_precomputed_targets():
    model = _tiny()
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9, clipnorm=10.0))
    # Normalised like an input pipeline would.
    images = np.random.default_rng(1).normal(0, 1, (2, 128, 128, 3)).astype("float32")
    gt = _ground_truth()

    def loss_now():
        return float(model.losses_from(gt, model(images, training=True))["total_loss"])

    before = loss_now()
    model.fit(tf.data.Dataset.from_tensors((images, gt)).repeat(12), verbose=0)
    after = loss_now()
    assert np.isfinite(after) and after < 0.85 * before, (before, after)
    # Targets built the TPU way (in the input pipeline) give the same loss as raw boxes.
    outputs = model(images, training=False)
    np.testing.assert_allclose(
        model.losses_from(model.labeler.targets(gt), outputs)["total_loss"],
        model.losses_from(gt, outputs)["total_loss"],
        rtol=1e-6,
    )
    history = model.fit(
        tf.data.Dataset.from_tensors((images, model.labeler.targets(gt))).repeat(2), verbose=0
    )
    assert np.isfinite(history.history["loss"][-1])


def test_weight_decay_defaults_to_the_papers_and_can_be_turned_off():
    model = _tiny()
    kernels = [w for w in model.trainable_weights if w.path.endswith("kernel")]
    assert len(model.losses) == len(kernels)
    assert model.get_config()["backbone"]["config"]["kernel_regularizer"]["config"] == {"l2": 2e-5}
    assert not _tiny(kernel_regularizer=None).losses


def test_mobile_head_regularises_its_separable_predictors_as_model_garden():
    model = build_retinanet("mobile-49XS", 5, 64, weight_decay=3e-5, **TINY_MOBILE)
    head = model.head
    for predictor in (head.classifier, head.box_predictor):
        for reg in (predictor.depthwise_regularizer, predictor.pointwise_regularizer):
            assert reg.get_config() == {"l2": 1.5e-5}
    assert head.cls_convs[0].depthwise_regularizer is None
    assert head.cls_convs[0].pointwise_regularizer is None


def test_missing_targets_are_named():
    model = _tiny()
    with pytest.raises(ValueError, match=r"got keys \['labels'\]"):
        model.labeler.targets({"labels": np.zeros((1, 3))})


def test_train_step_compiles_with_xla_under_mixed_bfloat16():
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = _tiny(
        block_specs=CUSTOM_SPECS,
        min_level=3,
        max_level=5,
        kernel_regularizer=keras.regularizers.L2(4e-5),
    )
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), jit_compile=True)
    images = np.random.default_rng(2).uniform(0, 255, (2, 128, 128, 3)).astype("float32")
    history = model.fit(
        tf.data.Dataset.from_tensors((images, _ground_truth())).repeat(2), verbose=0
    )
    assert np.isfinite(history.history["loss"][0])
    predict = tf.function(model.predict_step, jit_compile=True)
    assert predict(images)["boxes"].shape == (2, 100, 4)


def test_keras_save_load_round_trip(tmp_path):
    model = _tiny(
        "mobile-49XS",
        weighted_fusion=True,
        detection={"score_threshold": 0.01},
        matching={"unmatched_iou": 0.4},
        loss={"train_background": True},
    )
    path = tmp_path / "retinanet.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, RetinaNet)
    assert loaded.get_config() == model.get_config()
    assert loaded.labeler.matching == model.labeler.matching
    assert loaded.loss_config == model.loss_config == LossConfig(train_background=True)
    images = np.random.default_rng(3).uniform(0, 255, (1, 128, 128, 3)).astype("float32")
    for key, value in model(images).items():
        np.testing.assert_allclose(loaded(images)[key], value, rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="image_size"):
        build_retinanet("49S", 3, image_size=(1, 2, 3))
    with pytest.raises(ValueError, match="anchor levels 2-7 differ from the backbone's 3-7"):
        RetinaNet(spinenet_tf.build_backbone("49S", **TINY), 3, 128, anchor={"min_level": 2})
    with pytest.raises(ValueError, match=r"unknown model setting\(s\) \['unmatched_iou'\]"):
        build_retinanet("49S", 3, 64, unmatched_iou=0.4, **TINY)


def test_settings_merge_over_the_scaling_row():
    """Partial anchor / matching dicts change only their fields: anchor size stays the
    scaling table's (4 for 143), the levels the backbone's."""
    model = build_retinanet(
        "143", 3, 64, anchor={"num_scales": 2}, matching={"unmatched_iou": 0.4}, **TINY
    )
    assert model.anchor_config.anchor_size == 4.0 and model.anchor_config.num_scales == 2
    assert (model.anchor_config.min_level, model.anchor_config.max_level) == (3, 7)
    assert model.labeler.matching == MatchingConfig(unmatched_iou=0.4)
    assert model.head.settings == model.backbone.conv_settings
