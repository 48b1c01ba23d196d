"""Tasks: model, labels, losses, evaluation and serving of one kind of head."""

from spinenet_tf.tasks.base import Evaluator, ImageServing, Task, model_settings
from spinenet_tf.tasks.classification import ClassificationTask, ClassifierServing
from spinenet_tf.tasks.maskrcnn import MaskDetector, MaskRCNNTask
from spinenet_tf.tasks.retinanet import Detector, RetinaNetTask

__all__ = [
    "ClassificationTask",
    "ClassifierServing",
    "Detector",
    "Evaluator",
    "ImageServing",
    "MaskDetector",
    "MaskRCNNTask",
    "RetinaNetTask",
    "Task",
    "model_settings",
]
