"""spinenet_tf: SpineNet (Du et al., CVPR 2020) in TensorFlow 2 / Keras 3."""

from spinenet_tf.models.retinanet import RetinaNet, build_retinanet
from spinenet_tf.models.spinenet import SpineNet, build_backbone
from spinenet_tf.serving.export import export_saved_model
from spinenet_tf.specs import MODEL_IDS, BlockSpec, get_scaling
from spinenet_tf.tasks import RetinaNetTask, Task

__version__ = "0.1.0"

__all__ = [
    "MODEL_IDS",
    "BlockSpec",
    "RetinaNet",
    "RetinaNetTask",
    "SpineNet",
    "Task",
    "build_backbone",
    "build_retinanet",
    "export_saved_model",
    "get_scaling",
    "__version__",
]
