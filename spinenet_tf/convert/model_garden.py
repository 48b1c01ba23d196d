"""Import weights from TF Model Garden (tf-models-official) SpineNet models.

Model Garden is an optional dependency (`pip install spinenet_tf[modelgarden]`); it is
imported only by the functions that build its models.
"""

from __future__ import annotations

import re

import numpy as np

from spinenet_tf import specs as specs_lib
from spinenet_tf.models.spinenet import SpineNet

# The variables our conv and batch-norm layers own; everything else (fusion weights, the
# stochastic-depth seed state) has no Model Garden counterpart.
_CONVERTED_NAMES = {
    "kernel",
    "bias",
    "depthwise_kernel",
    "gamma",
    "beta",
    "moving_mean",
    "moving_variance",
}


def _creation_index(variable) -> int:
    # A TF resource variable's _unique_id ends in a process-wide counter taken at creation.
    # Model Garden's layers create their variables on first call, so this order is the order
    # of the forward pass, which is how our model lists its variables too.
    unique_id = getattr(variable, "_unique_id", None)
    match = re.search(r"_(\d+)$", str(unique_id))
    if match is None:
        raise ValueError(
            f"cannot order Model Garden variable {variable.name!r}: no creation counter "
            f"(_unique_id={unique_id!r}); is this a tf_keras model built eagerly?"
        )
    return int(match.group(1))


def model_garden_variables(model) -> list:
    """The variables of a Model Garden SpineNet / SpineNetMobile in forward-pass order."""
    return sorted(model.variables, key=_creation_index)


def spinenet_variables(model: SpineNet) -> list:
    """Our backbone's conv and batch-norm variables in forward-pass order."""
    in_model = {layer.name for layer in model.layers}
    out = []
    for name in model.call_order:
        if name not in in_model:  # blocks pruned because no output depends on them
            continue
        for w in model.get_layer(name).weights:
            if w.path.rsplit("/", 1)[-1] in _CONVERTED_NAMES:
                out.append(w)
    return out


def _backbone_of(model):
    # A Model Garden detector (RetinaNetModel, MaskRCNNModel) holds its backbone here.
    return getattr(model, "backbone", model)


def from_model_garden(source, target: SpineNet) -> SpineNet:
    """Copies the weights of a Model Garden SpineNet (or a detector holding one) into `target`.

    Raises ValueError naming the first variable whose shape differs, or when the two models
    have different numbers of variables.
    """
    source = _backbone_of(source)
    if not isinstance(target, SpineNet):
        raise TypeError(f"target must be a spinenet_tf SpineNet, got {type(target).__name__}")
    src_vars = model_garden_variables(source)
    dst_vars = spinenet_variables(target)
    for i, (src, dst) in enumerate(zip(src_vars, dst_vars, strict=False)):
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(
                f"variable {i}: ours {dst.path!r} has shape {tuple(dst.shape)} but Model "
                f"Garden's {src.name!r} has shape {tuple(src.shape)}; the two models are "
                "built with different settings (model_id, min/max level, block specs)"
            )
    if len(src_vars) != len(dst_vars):
        extra = (
            src_vars[len(dst_vars)].name
            if len(src_vars) > len(dst_vars)
            else dst_vars[len(src_vars)].path
        )
        raise ValueError(
            f"Model Garden's model has {len(src_vars)} variables and ours {len(dst_vars)}; "
            f"the first unpaired one is {extra!r}"
        )
    for src, dst in zip(src_vars, dst_vars, strict=True):
        dst.assign(np.asarray(src.numpy(), dtype=dst.dtype))
    return target


def build_model_garden_backbone(
    model_id: str,
    input_shape=(None, None, 3),
    min_level: int = 3,
    max_level: int = 7,
    activation: str | None = None,
    **kwargs,
):
    """Builds Model Garden's backbone for one of our model ids through its own factory."""
    import tf_keras
    from official.vision.configs import backbones as mg_backbones
    from official.vision.configs import common as mg_common
    from official.vision.modeling.backbones import factory as mg_factory

    scaling = specs_lib.get_scaling(model_id)
    if scaling.family == "mobile":
        config = mg_backbones.Backbone(
            type="spinenet_mobile",
            spinenet_mobile=mg_backbones.SpineNetMobile(
                model_id=model_id.split("-", 1)[1],
                min_level=min_level,
                max_level=max_level,
                **kwargs,
            ),
        )
    else:
        config = mg_backbones.Backbone(
            type="spinenet",
            spinenet=mg_backbones.SpineNet(
                model_id=model_id, min_level=min_level, max_level=max_level, **kwargs
            ),
        )
    norm = mg_common.NormActivation(activation=activation or scaling.activation)
    input_specs = tf_keras.layers.InputSpec(shape=[None, *input_shape])
    return mg_factory.build_backbone(
        input_specs=input_specs, backbone_config=config, norm_activation_config=norm
    )
