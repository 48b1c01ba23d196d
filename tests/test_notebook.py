"""examples/quickstart.ipynb runs top to bottom (at tiny settings), so it never rots."""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_SETTINGS = """
DATA_DIR = "shapes"
IMAGE_SIZE = 64
MODEL_OVERRIDES = dict(
    filter_size_scale=0.25, endpoints_num_filters=16, head_num_filters=16, head_num_convs=1
)
BATCH_SIZE = 4
EPOCHS = 2
STEPS_PER_EPOCH = 2
NUM_TRAIN, NUM_VAL = 8, 6
"""


@pytest.mark.slow  # a Jupyter kernel training a model: about a minute
def test_quickstart_notebook_executes(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    parameters = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(parameters) == 1
    parameters[0].source = TINY_SETTINGS
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "parameters" in text and "Epoch 2/2" in text
    assert "detections above 0.3 per image" in text
    assert re.search(r"held-out split: AP [0-9.]+, AP50 [0-9.]+, AP75 [0-9.]+", text)
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the loss curve and the detections
    assert (tmp_path / "shapes" / "records" / "DONE").exists()
