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
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "serving_default = image_bytes" in result.stdout and "4 labels" in result.stdout

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
    # The in-process model computes what its export serves.
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
