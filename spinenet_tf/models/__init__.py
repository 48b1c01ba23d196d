"""SpineNet models."""

from spinenet_tf.models.classifier import ClassificationHead, Classifier, build_classifier
from spinenet_tf.models.heads import RetinaNetHead
from spinenet_tf.models.mask_rcnn import MaskRCNN, build_maskrcnn
from spinenet_tf.models.rcnn_heads import BoxHead, MaskHead, RPNHead
from spinenet_tf.models.retinanet import RetinaNet, build_retinanet
from spinenet_tf.models.spinenet import SpineNet, build_backbone

__all__ = [
    "BoxHead",
    "MaskHead",
    "MaskRCNN",
    "RPNHead",
    "build_maskrcnn",
    "ClassificationHead",
    "Classifier",
    "RetinaNet",
    "RetinaNetHead",
    "SpineNet",
    "build_backbone",
    "build_classifier",
    "build_retinanet",
]
