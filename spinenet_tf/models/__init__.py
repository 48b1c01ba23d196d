"""SpineNet models."""

from spinenet_tf.models.classifier import ClassificationHead, Classifier, build_classifier
from spinenet_tf.models.heads import RetinaNetHead
from spinenet_tf.models.retinanet import RetinaNet, build_retinanet
from spinenet_tf.models.spinenet import SpineNet, build_backbone

__all__ = [
    "ClassificationHead",
    "Classifier",
    "RetinaNet",
    "RetinaNetHead",
    "SpineNet",
    "build_backbone",
    "build_classifier",
    "build_retinanet",
]
