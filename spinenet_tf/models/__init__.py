"""SpineNet models."""

from spinenet_tf.models.spinenet import SpineNet, build_backbone

__all__ = ["SpineNet", "build_backbone"]
