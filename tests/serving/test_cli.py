"""python -m spinenet_tf.export and python -m spinenet_tf.predict on a training checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spinenet_tf.data import shapes
from spinenet_tf.visualize import MIN_DRAW_SIZE
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = {**TINY, "head_num_filters": 16, "head_num_convs": 1}
GIN = [
    f"--gin_file={ROOT / 'gin_configs/experiments/quickstart.gin'}",
    "--gin_param=ExperimentConfig.image_size = 64",
    f"--gin_param=ExperimentConfig.model_overrides = {OVERRIDES!r}",
]


def _run(module, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shapes_dir):
    """A Trainer checkpoint (model and optimizer) of the quickstart model at tiny width, its
    classifier biased so that detections pass a 0.3 threshold."""
    from spinenet_tf.training.trainer import ExperimentConfig, Trainer

    config = ExperimentConfig(
        model_id="49S", num_classes=5, image_size=64, model_overrides=dict(OVERRIDES)
    )
    model_dir = tmp_path_factory.mktemp("run")
    trainer = Trainer(config, str(model_dir))
    rng = np.random.default_rng(0)
    for v in trainer.model.weights:
        if "class" in v.path and v.path.endswith("bias"):
            v.assign(rng.uniform(-1.0, 2.0, v.shape).astype("float32"))
    trainer.manager.save(checkpoint_number=7)
    return model_dir


@pytest.fixture(scope="module")
def images(tmp_path_factory, shapes_dir):
    """Three shapes validation images (their file names are their COCO ids) and a broken file."""
    folder = tmp_path_factory.mktemp("images")
    for path in sorted(shapes.image_dir(shapes_dir, "val").glob("*.jpg"))[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    return folder


@pytest.mark.slow  # export and predict processes
def test_export_then_predict_from_the_saved_model_and_from_the_checkpoint(
    checkpoint, images, shapes_dir, tmp_path
):
    labels = shapes.annotation_path(shapes_dir, "val")
    exported = tmp_path / "export"
    result = _run(
        "spinenet_tf.export",
        *GIN,
        f"--checkpoint={checkpoint}",
        f"--export_dir={exported}",
        f"--label_map={labels}",
        "--input_types=image_bytes,image_tensor",
        "--jit_compile",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "serving_default = image_bytes" in result.stdout and "4 labels" in result.stdout
    # XLA-compiled serving functions: the caveat for TF Serving is printed, and below they
    # serve what the checkpoint computes.
    assert "warning: --jit_compile: Stock TF Serving" in result.stderr

    outputs = {}
    for how, source in [
        ("saved_model", [f"--saved_model={exported}"]),
        ("checkpoint", [*GIN, f"--checkpoint={checkpoint}/ckpt-7", f"--label_map={labels}"]),
    ]:
        out = tmp_path / how
        result = _run(
            "spinenet_tf.predict",
            *source,
            f"--images={images / '*.jpg'}",
            f"--output_dir={out}",
            "--score_threshold=0.3",
            "--batch_size=2",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        # The broken file is named and skipped; the others are all there.
        assert "broken.jpg" in result.stderr and "cannot read it as an image" in result.stderr
        assert "3 images" in result.stdout and "1 unreadable files skipped" in result.stdout
        drawn = sorted(p.name for p in out.glob("*.png"))
        assert drawn == sorted(p.stem + ".png" for p in images.glob("0*.jpg"))
        # Drawn on the original image, enlarged to a readable 512 px on the long side.
        w, h = Image.open(images / (drawn[0][:-4] + ".jpg")).size
        scale = max(1.0, MIN_DRAW_SIZE / max(w, h))
        assert Image.open(out / drawn[0]).size == (round(w * scale), round(h * scale))
        outputs[how] = json.loads((out / "detections.json").read_text())

    results = outputs["saved_model"]
    assert len(results) > 3
    ids = {int(p.stem) for p in images.glob("0*.jpg")}
    for r in results:
        assert r["image_id"] in ids and r["score"] >= 0.3
        assert (
            r["category_name"]
            == {1: "ellipse", 2: "rectangle", 3: "triangle", 4: "star"}[r["category_id"]]
        )
        x, y, w, h = r["bbox"]
        assert x >= 0 and y >= 0 and w >= 0 and h >= 0 and x + w <= 64.01 and y + h <= 64.01
    # The in-process model computes what its (XLA-compiled) export serves.
    other = outputs["checkpoint"]
    assert [(r["image_id"], r["category_id"]) for r in other] == [
        (r["image_id"], r["category_id"]) for r in results
    ]
    np.testing.assert_allclose(
        [r["bbox"] + [r["score"]] for r in other],
        [r["bbox"] + [r["score"]] for r in results],
        atol=1e-3,
    )


@pytest.mark.slow  # command-line processes
def test_bad_checkpoints_and_missing_images_are_named(checkpoint, tmp_path):
    result = _run(
        "spinenet_tf.export", *GIN, f"--checkpoint={tmp_path}", f"--export_dir={tmp_path / 'x'}"
    )
    assert result.returncode != 0 and f"no checkpoint in directory {tmp_path}" in result.stderr
    result = _run(
        "spinenet_tf.predict",
        f"--saved_model={tmp_path}",
        f"--images={tmp_path / 'nothing*.jpg'}",
        f"--output_dir={tmp_path / 'out'}",
    )
    assert result.returncode != 0 and "no files match" in result.stderr


def test_restore_model_rejects_a_checkpoint_of_another_model(checkpoint):
    from spinenet_tf import build_retinanet
    from spinenet_tf.training.checkpoints import restore_model

    other = build_retinanet("49S", 5, 64, **TINY, head_num_convs=2)
    with pytest.raises(ValueError, match="does not fit this model"):
        restore_model(other, str(checkpoint))
    with pytest.raises(ValueError, match="no checkpoint at"):
        restore_model(other, str(checkpoint / "ckpt-99"))


# Flag checks in one process (TensorFlow's import is most of a run's time): each set of
# arguments parsed into the export CLI's flags and given to its check_flags.
_CHECK_FLAGS = """
import json, sys
from absl import app
from spinenet_tf import export
for args in json.loads(sys.argv[1]):
    export.FLAGS.unparse_flags()
    export.FLAGS(["export", *args])
    try:
        export.check_flags(export.FLAGS)
        print("accepted")
    except app.UsageError as e:
        print(f"UsageError: {e}")
"""


def test_tflite_flags_that_do_not_go_together_are_named(tmp_path):
    required = [f"--checkpoint={tmp_path}", f"--export_dir={tmp_path / 'x'}", *GIN]
    # The CLI itself: a usage error, exit status non-zero, the message on stderr.
    result = _run("spinenet_tf.export", *required, "--quantization=int8")
    assert result.returncode != 0
    assert "--quantization apply to --format=tflite only" in result.stderr, result.stderr[-2000:]
    cases = [
        (
            ["--format=tflite", "--int8_io=uint8"],
            "--int8_io=uint8 needs --quantization=int8, got --quantization=none",
        ),
        (["--format=tflite", "--jit_compile"], "--jit_compile applies to --format=saved_model"),
        (
            ["--format=tflite", "--tflite_postprocess=raw", "--tflite_nms=per_class"],
            "--tflite_nms applies to --tflite_postprocess=custom_op or builtin",
        ),
        (["--format=tflite", "--tflite_postprocess=builtin", "--tflite_nms=per_class"], None),
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    args = json.dumps([[*map(str, required), *flags] for flags, _ in cases])
    result = subprocess.run(
        [sys.executable, "-c", _CHECK_FLAGS, args], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith(("Usage", "acc"))]
    assert len(lines) == len(cases), result.stdout
    for line, (flags, message) in zip(lines, cases, strict=True):
        if message is None:
            assert line == "accepted", (flags, line)
        else:
            assert line.startswith("UsageError: ") and message in line, (flags, line)


@pytest.mark.slow  # export and predict processes
def test_export_int8_tflite_then_predict_with_it(checkpoint, images, shapes_records, tmp_path):
    """int8 calibrated on the experiment's own training pipeline (here the test records),
    then predict --tflite: the same detections as the float32 TFLite file, near enough."""
    data = [
        f"--gin_param=train/DataConfig.source = '{shapes_records['train']}'",
        "--gin_param=ExperimentConfig.synthetic_data_dir = ''",
    ]
    exported = tmp_path / "tflite"
    records = {}
    for quantization in ("none", "int8"):
        result = _run(
            "spinenet_tf.export",
            *GIN,
            *data,
            f"--checkpoint={checkpoint}",
            f"--export_dir={exported}",
            "--format=tflite",
            f"--quantization={quantization}",
            *(["--calibration_steps=8"] if quantization == "int8" else []),
        )
        assert result.returncode == 0, result.stderr[-3000:]
        name = "float32" if quantization == "none" else quantization
        path = exported / f"model_{name}.tflite"
        assert f"to {path}" in result.stdout
        contract = json.loads((exported / f"model_{name}.json").read_text())
        assert contract["input"]["shape"] == [1, 64, 64, 3]
        assert contract["label_map"]["4"] == "star"
        if quantization == "none":  # predict reads the contract in the file
            (exported / f"model_{name}.json").unlink()
        out = tmp_path / f"predictions_{name}"
        result = _run(
            "spinenet_tf.predict",
            f"--tflite={path}",
            f"--images={images / '*.jpg'}",
            f"--output_dir={out}",
            "--score_threshold=0.3",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "3 images" in result.stdout and "1 unreadable files skipped" in result.stdout
        assert len(list(out.glob("*.png"))) == 3
        records[name] = json.loads((out / "detections.json").read_text())
    assert len(records["float32"]) > 3
    best = {}
    for r in records["int8"]:
        key = (r["image_id"], r["category_id"])
        best[key] = max(best.get(key, 0), r["score"])
    for r in records["float32"][:5]:
        assert (r["image_id"], r["category_id"]) in best
    result = _run(
        "spinenet_tf.predict",
        f"--tflite={tmp_path / 'missing.tflite'}",
        f"--images={images / '*.jpg'}",
        f"--output_dir={tmp_path / 'x'}",
    )
    assert result.returncode != 0 and "no TFLite file" in result.stderr
