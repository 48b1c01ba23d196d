"""spinenet_tf: SpineNet (Du et al., CVPR 2020) in TensorFlow 2 / Keras 3.

The public names load on first use, so that the commands (`python -m spinenet_tf.train`)
can set up the console before TensorFlow is imported.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "MODEL_IDS": "spinenet_tf.specs",
    "BlockSpec": "spinenet_tf.specs",
    "get_scaling": "spinenet_tf.specs",
    "Classifier": "spinenet_tf.models.classifier",
    "build_classifier": "spinenet_tf.models.classifier",
    "ClassificationTask": "spinenet_tf.tasks",
    "MaskRCNN": "spinenet_tf.models.mask_rcnn",
    "RetinaNet": "spinenet_tf.models.retinanet",
    "build_maskrcnn": "spinenet_tf.models.mask_rcnn",
    "build_retinanet": "spinenet_tf.models.retinanet",
    "SpineNet": "spinenet_tf.models.spinenet",
    "build_backbone": "spinenet_tf.models.spinenet",
    "export_saved_model": "spinenet_tf.serving.export",
    "export_tflite": "spinenet_tf.serving.tflite",
    "MaskRCNNTask": "spinenet_tf.tasks",
    "RetinaNetTask": "spinenet_tf.tasks",
    "Task": "spinenet_tf.tasks",
}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'spinenet_tf' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
