"""Import weights from TF Model Garden (tf-models-official) SpineNet models.

Model Garden is an optional dependency (`pip install spinenet_tf[modelgarden]`); it is
imported only by the functions that build its models.
"""

from __future__ import annotations

import re

import numpy as np

from spinenet_tf import specs as specs_lib
from spinenet_tf.models.mask_rcnn import MaskRCNN
from spinenet_tf.models.retinanet import RetinaNet
from spinenet_tf.models.spinenet import SpineNet

# The variables our conv and batch-norm layers own; everything else (fusion weights, the
# stochastic-depth seed state) has no Model Garden counterpart.
_CONVERTED_NAMES = {
    "kernel",
    "bias",
    "depthwise_kernel",
    "pointwise_kernel",
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


def _converted(layers) -> list:
    return [
        w
        for layer in layers
        for w in layer.weights
        if w.path.rsplit("/", 1)[-1] in _CONVERTED_NAMES
    ]


def spinenet_variables(model: SpineNet) -> list:
    """Our backbone's conv and batch-norm variables in forward-pass order."""
    in_model = {layer.name for layer in model.layers}
    # Blocks no output depends on are pruned from the model and skipped.
    return _converted(model.get_layer(n) for n in model.call_order if n in in_model)


def _backbone_of(model):
    # A Model Garden detector (RetinaNetModel, MaskRCNNModel) holds its backbone here.
    return getattr(model, "backbone", model)


def _copy(src_vars, dst_vars, what: str):
    for i, (src, dst) in enumerate(zip(src_vars, dst_vars, strict=False)):
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(
                f"{what} variable {i}: ours {dst.path!r} has shape {tuple(dst.shape)} but Model "
                f"Garden's {src.name!r} has shape {tuple(src.shape)}; the two models are "
                "built with different settings (model_id, min/max level, block specs, head)"
            )
    if len(src_vars) != len(dst_vars):
        extra = (
            src_vars[len(dst_vars)].name
            if len(src_vars) > len(dst_vars)
            else dst_vars[len(src_vars)].path
        )
        raise ValueError(
            f"{what}: Model Garden's has {len(src_vars)} variables and ours {len(dst_vars)}; "
            f"the first unpaired one is {extra!r}"
        )
    for src, dst in zip(src_vars, dst_vars, strict=True):
        dst.assign(np.asarray(src.numpy(), dtype=dst.dtype))


def from_model_garden(source, target):
    """Copies the weights of a Model Garden model into ours and returns `target`.

    `target` is a SpineNet backbone (then `source` is a Model Garden SpineNet /
    SpineNetMobile, or a detector holding one), a RetinaNet (then `source` is a Model
    Garden RetinaNetModel) or a MaskRCNN (a Model Garden MaskRCNNModel with a mask head;
    the samplers' seed state has no counterpart and is left as it is). Raises ValueError
    naming the first variable whose shape differs, or when the two have different numbers
    of variables.
    """
    if isinstance(target, MaskRCNN):
        if not hasattr(source, "rpn_head") or getattr(source, "mask_head", None) is None:
            raise TypeError(
                f"a MaskRCNN needs a Model Garden MaskRCNNModel with a mask head, got "
                f"{type(source).__name__}"
            )
        _copy(
            model_garden_variables(source.backbone), spinenet_variables(target.backbone), "backbone"
        )
        _copy_by_name(_maskrcnn_heads(source, target))
        return target
    if isinstance(target, RetinaNet):
        if not hasattr(source, "head"):
            raise TypeError(
                f"a RetinaNet needs a Model Garden RetinaNetModel, got {type(source).__name__}"
            )
        _copy(
            model_garden_variables(source.backbone), spinenet_variables(target.backbone), "backbone"
        )
        _copy(
            model_garden_variables(source.head), _converted(target.head.call_order_layers()), "head"
        )
        return target
    if not isinstance(target, SpineNet):
        raise TypeError(
            f"target must be a spinenet_tf SpineNet or RetinaNet, got {type(target).__name__}"
        )
    _copy(model_garden_variables(_backbone_of(source)), spinenet_variables(target), "backbone")
    return target


def _maskrcnn_heads(source, target) -> list:
    """[(Model Garden layer, our layer, what)] for the three heads of a Mask R-CNN, by Model
    Garden's layer names (official/vision/modeling/heads)."""
    heads = (source.rpn_head, source.detection_head[0], source.mask_head)
    layers = {
        layer.name: layer
        for head in heads
        for layer in head._flatten_layers(include_self=False)  # noqa: SLF001
    }
    rpn, box, mask = target.rpn_head, target.box_head, target.mask_head
    pairs = [("rpn-scores", rpn.scores), ("rpn-boxes", rpn.boxes)]
    for i, conv in enumerate(rpn.convs):
        pairs.append((f"rpn-conv_{i}", conv))
        for level, norms in zip(rpn.levels, rpn.norms, strict=True):
            pairs.append((f"rpn-conv-norm_{level}_{i}", norms[i]))
    for prefix, head in (("detection", box), ("mask", mask)):
        for i, (conv, norm) in enumerate(zip(head.convs, head.norms, strict=True)):
            pairs += [(f"{prefix}-conv_{i}", conv), (f"{prefix}-conv-bn_{i}", norm)]
    pairs += [
        ("detection-fc_0", box.fc),
        ("detection-fc-bn_0", box.fc_norm),
        ("detection-scores", box.classifier),
        ("detection-boxes", box.box_predictor),
        ("mask-upsampling", mask.upsample),
        ("mask-deconv-bn", mask.upsample_norm),
        ("mask-logits", mask.logits),
    ]
    missing = sorted(name for name, _ in pairs if name not in layers)
    if missing:
        raise ValueError(
            f"Model Garden's Mask R-CNN has no layer {missing[0]!r} (of {len(missing)} missing); "
            "the two models are built with different head settings (num_convs, levels)"
        )
    names = dict(pairs)
    unpaired = sorted(
        n for n, layer in layers.items() if layer.weights and n not in names and layer not in heads
    )
    if unpaired:
        raise ValueError(f"Model Garden's Mask R-CNN heads have layers we lack: {unpaired}")
    return [(layers[name], layer, name) for name, layer in pairs]


def _copy_by_name(pairs):
    """Copies each Model Garden layer's variables into our layer's, matched by variable kind
    (kernel, bias, gamma, beta, moving_mean, moving_variance)."""

    def kinds(variables, key):
        out = {key(v).rsplit("/", 1)[-1].split(":")[0]: v for v in variables}
        return {k: v for k, v in out.items() if k in _CONVERTED_NAMES}

    for theirs, ours, name in pairs:
        src = kinds(theirs.weights, lambda v: v.name)
        dst = kinds(ours.weights, lambda v: v.path)
        if src.keys() != dst.keys():
            raise ValueError(
                f"{name}: Model Garden's variables {sorted(src)} differ from ours {sorted(dst)}"
            )
        _copy([src[k] for k in sorted(src)], [dst[k] for k in sorted(src)], name)


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


def model_garden_retinanet_config(
    model_id: str,
    num_classes: int,
    image_size: int,
    head_num_convs: int | None = None,
    head_num_filters: int | None = None,
    min_level: int = 3,
    max_level: int = 7,
    **detection,
):
    """Model Garden's RetinaNet model config for one of our model ids, configured like ours.

    `min_level` / `max_level`: the backbone's output levels and the head's (Model Garden's
    SpineNet takes its block list from spinenet.SPINENET_BLOCK_SPECS only; a test with
    other blocks patches that list). `detection` overrides fields of Model Garden's
    DetectionGenerator config (pre_nms_top_k, pre_nms_score_threshold, nms_iou_threshold,
    max_num_detections, ...).
    """
    from official.vision.configs import backbones as mg_backbones
    from official.vision.configs import common as mg_common
    from official.vision.configs import decoders as mg_decoders
    from official.vision.configs import retinanet as mg_retinanet

    scaling = specs_lib.get_scaling(model_id)
    if scaling.family == "mobile":
        backbone = mg_backbones.Backbone(
            type="spinenet_mobile",
            spinenet_mobile=mg_backbones.SpineNetMobile(
                model_id=model_id.split("-", 1)[1], min_level=min_level, max_level=max_level
            ),
        )
    else:
        backbone = mg_backbones.Backbone(
            type="spinenet",
            spinenet=mg_backbones.SpineNet(
                model_id=model_id, min_level=min_level, max_level=max_level
            ),
        )
    return mg_retinanet.RetinaNet(
        num_classes=num_classes,
        min_level=min_level,
        max_level=max_level,
        input_size=[image_size, image_size, 3],
        anchor=mg_retinanet.Anchor(
            num_scales=3, aspect_ratios=[0.5, 1.0, 2.0], anchor_size=scaling.anchor_size
        ),
        backbone=backbone,
        decoder=mg_decoders.Decoder(type="identity"),
        head=mg_retinanet.RetinaNetHead(
            num_convs=head_num_convs or scaling.head_num_convs,
            num_filters=head_num_filters or scaling.head_num_filters,
            use_separable_conv=scaling.head_separable,
        ),
        detection_generator=mg_retinanet.DetectionGenerator(**detection),
        norm_activation=mg_common.NormActivation(activation=scaling.activation),
    )


def build_model_garden_retinanet(model_id: str, num_classes: int, image_size: int, **kwargs):
    """Model Garden's RetinaNet for one of our model ids, configured like ours (`kwargs`: see
    `model_garden_retinanet_config`)."""
    import tf_keras
    from official.vision.modeling import factory as mg_factory

    config = model_garden_retinanet_config(model_id, num_classes, image_size, **kwargs)
    input_specs = tf_keras.layers.InputSpec(shape=[None, image_size, image_size, 3])
    model = mg_factory.build_retinanet(input_specs, config)
    # The head creates its variables on the first call, in forward order.
    model(np.zeros([1, image_size, image_size, 3], np.float32), training=False)
    return model


def build_model_garden_retinanet_task(
    model_id: str,
    num_classes: int,
    image_size: int,
    weight_decay: float,
    norm_epsilon: float | None = None,
    use_sync_bn: bool = True,
    **kwargs,
):
    """Model Garden's RetinaNetTask (official/vision/tasks/retinanet.py) for one of our model
    ids, with its losses at the values of ours and of its SpineNet recipes (focal alpha 0.25,
    gamma 1.5, Huber delta 0.1, box weight 50) and L2 `weight_decay` (its kernel regularisers
    are l2(weight_decay / 2)). `kwargs`: see `model_garden_retinanet_config`."""
    from official.vision.configs import retinanet as mg_retinanet
    from official.vision.tasks.retinanet import RetinaNetTask

    model = model_garden_retinanet_config(model_id, num_classes, image_size, **kwargs)
    model.norm_activation.use_sync_bn = use_sync_bn
    if norm_epsilon is not None:
        model.norm_activation.norm_epsilon = norm_epsilon
    losses = mg_retinanet.Losses(
        focal_loss_alpha=0.25,
        focal_loss_gamma=1.5,
        huber_loss_delta=0.1,
        box_loss_weight=50,
        l2_weight_decay=weight_decay,
    )
    return RetinaNetTask(mg_retinanet.RetinaNetTask(model=model, losses=losses))


def build_model_garden_sgd(
    task,
    learning_rate: float,
    momentum: float,
    warmup_steps: int,
    warmup_learning_rate: float,
    boundaries=(),
    values=None,
):
    """The optimizer Model Garden's trainer gives `task` (its OptimizerFactory): SGD with
    momentum, linear warm-up from `warmup_learning_rate`, stepwise rates `values` changing once
    step > each of `boundaries` (constant `learning_rate` without boundaries)."""
    from official.modeling import optimization

    if boundaries:
        rate = {"type": "stepwise", "stepwise": {"boundaries": list(boundaries), "values": values}}
    else:
        rate = {"type": "constant", "constant": {"learning_rate": learning_rate}}
    config = optimization.OptimizationConfig(
        {
            "optimizer": {"type": "sgd", "sgd": {"momentum": momentum}},
            "learning_rate": rate,
            "warmup": {
                "type": "linear",
                "linear": {
                    "warmup_steps": warmup_steps,
                    "warmup_learning_rate": warmup_learning_rate,
                },
            },
        }
    )
    return task.create_optimizer(config)


def model_garden_retinanet_labels(task, groundtruth) -> dict:
    """The labels Model Garden's parser (official/vision/dataloaders/retinanet_input.py) gives
    `task` for padded ground truth {"boxes": [B, N, 4] pixels, "classes": [B, N], -1 = padding}:
    per image, the padding rows dropped and its AnchorLabeler run; batched."""
    import tensorflow as tf
    from official.vision.ops import anchor

    config = task.task_config
    a = config.model.anchor
    size = config.model.input_size[:2]
    anchor_boxes = anchor.Anchor(
        config.model.min_level,
        config.model.max_level,
        a.num_scales,
        a.aspect_ratios,
        a.anchor_size,
        size,
    ).multilevel_boxes
    parser = config.train_data.parser
    labeler = anchor.AnchorLabeler(parser.match_threshold, parser.unmatched_threshold)
    per_image = []
    for boxes, classes in zip(
        np.asarray(groundtruth["boxes"]), np.asarray(groundtruth["classes"]), strict=True
    ):
        keep = classes >= 0
        cls_targets, box_targets, _, cls_weights, box_weights = labeler.label_anchors(
            anchor_boxes, tf.constant(boxes[keep]), tf.constant(classes[keep][:, None])
        )
        per_image.append((cls_targets, box_targets, cls_weights, box_weights))
    levels = list(anchor_boxes)
    return {
        "cls_targets": {k: tf.stack([p[0][k] for p in per_image]) for k in levels},
        "box_targets": {k: tf.stack([p[1][k] for p in per_image]) for k in levels},
        "cls_weights": tf.stack([p[2] for p in per_image]),
        "box_weights": tf.stack([p[3] for p in per_image]),
    }


def build_model_garden_maskrcnn(
    model_id: str,
    num_classes: int,
    image_size: int,
    head_num_filters: int = 256,
    head_fc_dims: int = 1024,
    activation: str = "relu",
):
    """Model Garden's Mask R-CNN-SpineNet (its factory's `maskrcnn_spinenet_coco` model: 3
    anchors a location of size 3, identity decoder, 4 convs + 1 FC in the box head), with
    every variable created: the heads are called once on zeros, in the order of the forward
    pass."""
    import tensorflow as tf
    import tf_keras
    from official.vision.configs import backbones as mg_backbones
    from official.vision.configs import common as mg_common
    from official.vision.configs import decoders as mg_decoders
    from official.vision.configs import maskrcnn as mg_maskrcnn
    from official.vision.modeling import factory as mg_factory

    filters = head_num_filters
    config = mg_maskrcnn.MaskRCNN(
        num_classes=num_classes,
        input_size=[image_size, image_size, 3],
        min_level=3,
        max_level=7,
        anchor=mg_maskrcnn.Anchor(num_scales=1, aspect_ratios=[0.5, 1.0, 2.0], anchor_size=3),
        backbone=mg_backbones.Backbone(
            type="spinenet", spinenet=mg_backbones.SpineNet(model_id=model_id)
        ),
        decoder=mg_decoders.Decoder(type="identity"),
        rpn_head=mg_maskrcnn.RPNHead(num_filters=filters),
        detection_head=mg_maskrcnn.DetectionHead(num_filters=filters, fc_dims=head_fc_dims),
        mask_head=mg_maskrcnn.MaskHead(num_filters=filters),
        norm_activation=mg_common.NormActivation(activation=activation),
        include_mask=True,
    )
    input_specs = tf_keras.layers.InputSpec(shape=[None, image_size, image_size, 3])
    model = mg_factory.build_maskrcnn(input_specs, config)
    channels = model.backbone.output_specs["3"][-1]
    if not model.rpn_head.weights:  # the factory calls it only with a non-identity decoder
        model.rpn_head({str(level): tf.zeros([1, 2, 2, channels]) for level in range(3, 8)})
    model.detection_head[0](tf.zeros([1, 1, 7, 7, channels]))
    model.mask_head([tf.zeros([1, 1, 14, 14, channels]), tf.zeros([1, 1], tf.int32)])
    return model
