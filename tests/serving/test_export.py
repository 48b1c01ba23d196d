"""SavedModel export: signatures, parity with the Python model, a TensorFlow-only consumer,
saved_model_cli, bad requests, static shapes, label maps."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from spinenet_tf import MODEL_IDS, build_retinanet
from spinenet_tf.data import shapes
from spinenet_tf.data.parsers import detection_parser
from spinenet_tf.ops.geometry import scaled_image_hw
from spinenet_tf.serving.export import Detector, export_saved_model
from tests.conftest import (
    FIVE_BLOCKS,
    TENSORFLOW_ONLY,
    TINY,
    TINY_MOBILE,
    randomize_batch_norm_stats,
)

ROOT = Path(__file__).resolve().parents[2]
LABELS = {1: "ellipse", 2: "rectangle", 3: "triangle", 4: "star"}
# Every anchor scores, so outputs are full and parity covers all 20 rows.
DETECTION = {"score_threshold": 0.0, "max_detections": 20}


def _tiny_model(model_id="49S", size=64):
    # Five blocks (levels 3-5) for 49S: its fifteen add nothing here but tracing time.
    tiny = TINY_MOBILE if model_id.startswith("mobile") else dict(TINY, **FIVE_BLOCKS)
    model = build_retinanet(model_id, 5, size, **tiny, head_num_convs=1, detection=DETECTION)
    randomize_batch_norm_stats(model, np.random.default_rng(0))
    return model


@pytest.fixture(scope="module")
def model():
    return _tiny_model()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "saved_model"
    export_saved_model(model, str(path), label_map=LABELS)
    return path


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _example(encoded: bytes) -> bytes:
    feature = {"image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded]))}
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _reference(model, image: np.ndarray) -> dict:
    """The Python model on the evaluation pipeline's input, boxes mapped back by image_info."""
    parse = detection_parser(model.image_size, training=False)
    d = {
        "image": tf.constant(image),
        "source_id": tf.constant(1, tf.int64),
        "boxes": tf.zeros([0, 4]),
        "classes": tf.zeros([0], tf.int32),
        "is_crowd": tf.zeros([0], tf.bool),
        "areas": tf.zeros([0]),
    }
    net_input, gt = parse(d)
    valid_hw = scaled_image_hw(gt["image_info"][None])
    det = model.detect(model(net_input[None], training=False), valid_hw)
    det = {k: v.numpy()[0] for k, v in det.items()}
    scale = np.tile(gt["image_info"][2].numpy(), 2)
    det["boxes"] = np.minimum(det["boxes"] / scale, np.tile(image.shape[:2], 2))
    return det


def _assert_matches(served: dict, row: int, reference: dict):
    n = int(reference["num_detections"])
    assert n == DETECTION["max_detections"]
    assert int(served["num_detections"][row]) == n
    np.testing.assert_array_equal(served["detection_classes"][row], reference["classes"])
    np.testing.assert_allclose(served["detection_scores"][row], reference["scores"], atol=1e-5)
    np.testing.assert_allclose(served["detection_boxes"][row], reference["boxes"], atol=2e-3)
    names = [LABELS.get(int(c), "") for c in reference["classes"]]
    assert [s.decode() for s in served["detection_class_names"][row]] == names


CONSUMER = (
    TENSORFLOW_ONLY
    + """
import numpy as np, tensorflow as tf
inputs = dict(np.load(sys.argv[2]))
model = tf.saved_model.load(sys.argv[1])
out = {}
for name, key in [("image_tensor", "tensor"), ("image_bytes", "bytes"),
                  ("tf_example", "examples"), ("serving_default", "tensor")]:
    for k, v in model.signatures[name](inputs=tf.constant(inputs[key])).items():
        out[f"{name}/{k}"] = v.numpy()
try:
    model.signatures["image_bytes"](inputs=tf.constant([b"not an image"]))
    out["bad_request"] = np.array("served")
except tf.errors.InvalidArgumentError as e:
    out["bad_request"] = np.array("InvalidArgumentError: " + e.message)
again = model.signatures["image_bytes"](inputs=tf.constant(inputs["bytes"][:1]))
out["after_bad/num_detections"] = again["num_detections"].numpy()
blocked = [m for m in sys.modules if m.split(".")[0] in ("keras", "tf_keras", "spinenet_tf")]
out["imported"] = np.array(",".join(blocked))
np.savez(sys.argv[3], **out)
"""
)


def test_saved_model_serves_with_tensorflow_only_and_matches_the_model(
    model, exported, shapes_dir, tmp_path
):
    rng = np.random.default_rng(1)
    jpegs = sorted((shapes.image_dir(shapes_dir, "val")).glob("*.jpg"))[:2]
    odd = rng.integers(0, 255, (37, 90, 3), dtype=np.uint8)  # wide, not a multiple of 2
    tall = rng.integers(0, 255, (120, 50, 3), dtype=np.uint8)  # larger than the input
    encoded = [p.read_bytes() for p in jpegs] + [_png(odd), _png(tall)]
    decoded = [tf.io.decode_image(e, channels=3).numpy() for e in encoded]
    np.savez(
        tmp_path / "inputs.npz",
        tensor=np.stack([odd, odd[::-1]]),
        bytes=np.array(encoded, dtype=object).astype(bytes),
        examples=np.array([_example(e) for e in encoded[:2]], dtype=object).astype(bytes),
    )
    script = tmp_path / "consumer.py"
    script.write_text(CONSUMER)
    result = subprocess.run(
        [sys.executable, str(script), str(exported), tmp_path / "inputs.npz", tmp_path / "out"],
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        cwd=tmp_path,  # not the repository: spinenet_tf is not on the path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = np.load(tmp_path / "out.npz", allow_pickle=True)  # string outputs: our own file
    assert str(out["imported"]) == ""

    def served(signature):
        prefix = signature + "/"
        return {k[len(prefix) :]: out[k] for k in out.files if k.startswith(prefix)}

    tensor = served("image_tensor")
    assert tensor["detection_boxes"].shape == (2, 20, 4)
    _assert_matches(tensor, 0, _reference(model, odd))
    _assert_matches(tensor, 1, _reference(model, odd[::-1]))
    np.testing.assert_array_equal(
        served("serving_default")["detection_boxes"], tensor["detection_boxes"]
    )
    by_bytes = served("image_bytes")
    for row, image in enumerate(decoded):
        _assert_matches(by_bytes, row, _reference(model, image))
        assert (by_bytes["detection_boxes"][row][:, 2:] <= image.shape[:2]).all()
    examples = served("tf_example")
    for row in range(2):
        _assert_matches(examples, row, _reference(model, decoded[row]))

    assert str(out["bad_request"]).startswith("InvalidArgumentError")
    assert "image" in str(out["bad_request"]).lower()
    np.testing.assert_array_equal(out["after_bad/num_detections"], by_bytes["num_detections"][:1])
    labels = json.loads((exported / "assets.extra" / "label_map.json").read_text())
    assert {int(k): v for k, v in labels.items()} == LABELS


@pytest.mark.slow  # saved_model_cli processes
def test_saved_model_cli_shows_and_runs_the_export(exported, tmp_path):
    cli = Path(sys.executable).with_name("saved_model_cli")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    shown = subprocess.run(
        [cli, "show", "--dir", exported, "--all"], capture_output=True, text=True, env=env
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    for name in ("image_tensor", "image_bytes", "tf_example", "serving_default"):
        assert f"signature_def['{name}']" in shown.stdout
    assert "shape: (-1, -1, -1, 3)" in shown.stdout  # any batch, any image size
    np.save(tmp_path / "image.npy", np.full((1, 30, 70, 3), 128, np.uint8))
    ran = subprocess.run(
        [
            cli,
            "run",
            "--dir",
            exported,
            "--tag_set",
            "serve",
            "--signature_def",
            "image_tensor",
            "--inputs",
            f"inputs={tmp_path / 'image.npy'}",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert "detection_boxes" in ran.stdout and "num_detections" in ran.stdout


def test_network_and_decoding_have_static_shapes_past_the_resize(model):
    detector = Detector(model)
    fn = tf.function(detector.from_image_bytes).get_concrete_function(
        tf.TensorSpec([None], tf.string)
    )
    assert fn.output_shapes["detection_boxes"].as_list() == [None, 20, 4]
    network = detector._network.get_concrete_function(
        tf.TensorSpec([None, 64, 64, 3]), tf.TensorSpec([None, 2])
    )
    heavy = [
        op
        for op in network.graph.get_operations()
        if op.type in ("Conv2D", "DepthwiseConv2dNative", "MaxPool", "FusedBatchNormV3", "TopKV2")
    ]
    assert len(heavy) > 50
    for op in heavy:
        assert op.outputs[0].shape[1:].is_fully_defined(), (op.name, op.outputs[0].shape)


def test_bad_arguments_are_named(model, tmp_path):
    with pytest.raises(ValueError, match="png_bytes"):
        export_saved_model(model, str(tmp_path), input_types=["png_bytes"])
    with pytest.raises(TypeError, match="uint8"):
        Detector(model).from_image_tensor(np.zeros((1, 8, 8, 3), np.float32))


@pytest.mark.slow
@pytest.mark.parametrize("model_id", [m for m in MODEL_IDS if m != "49S"])
def test_every_model_id_exports_and_serves(model_id, tmp_path):
    model = _tiny_model(model_id, size=64)
    export_saved_model(model, str(tmp_path / "sm"), input_types=["image_bytes"])
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    image = np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)
    out = loaded.signatures["serving_default"](inputs=tf.constant([_png(image)]))
    ref = _reference(model, image)
    np.testing.assert_array_equal(out["detection_classes"][0], ref["classes"])
    np.testing.assert_allclose(out["detection_scores"][0], ref["scores"], atol=1e-5)
    np.testing.assert_allclose(out["detection_boxes"][0], ref["boxes"], atol=2e-3)


@pytest.mark.slow
def test_xla_compiled_export_serves_the_same_detections(tmp_path):
    model = _tiny_model()
    rng = np.random.default_rng(5)
    for v in model.weights:  # distinct scores: with ties, which box NMS keeps is arbitrary
        if "class" in v.path and "kernel" in v.path:
            v.assign(rng.normal(0.0, 0.2, v.shape).astype("float32"))
        elif "class" in v.path and v.path.endswith("bias"):
            v.assign(rng.normal(-2.0, 1.0, v.shape).astype("float32"))
    export_saved_model(model, str(tmp_path / "plain"), input_types=["image_tensor"])
    export_saved_model(model, str(tmp_path / "xla"), input_types=["image_tensor"], jit_compile=True)
    image = tf.constant(np.random.default_rng(2).integers(0, 255, (2, 48, 80, 3), dtype=np.uint8))
    plain = tf.saved_model.load(str(tmp_path / "plain")).signatures["image_tensor"](inputs=image)
    xla = tf.saved_model.load(str(tmp_path / "xla")).signatures["image_tensor"](inputs=image)
    assert len(np.unique(np.round(plain["detection_scores"][0], 4))) > 15
    np.testing.assert_array_equal(xla["num_detections"], plain["num_detections"])
    np.testing.assert_array_equal(xla["detection_classes"], plain["detection_classes"])
    np.testing.assert_allclose(xla["detection_scores"], plain["detection_scores"], atol=1e-4)
    np.testing.assert_allclose(xla["detection_boxes"], plain["detection_boxes"], atol=0.05)


@pytest.mark.slow
def test_bfloat16_export_is_close_to_float32(model, exported, tmp_path):
    import keras

    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        half = _tiny_model()
    finally:
        keras.config.set_dtype_policy("float32")
    half.set_weights(model.get_weights())
    export_saved_model(half, str(tmp_path / "bf16"), input_types=["image_tensor"])
    image = tf.constant(np.random.default_rng(3).integers(0, 255, (1, 48, 80, 3), dtype=np.uint8))
    full = tf.saved_model.load(str(exported)).signatures["image_tensor"](inputs=image)
    out = tf.saved_model.load(str(tmp_path / "bf16")).signatures["image_tensor"](inputs=image)
    assert out["detection_scores"].dtype == tf.float32
    np.testing.assert_allclose(
        np.sort(out["detection_scores"][0]), np.sort(full["detection_scores"][0]), atol=0.02
    )
