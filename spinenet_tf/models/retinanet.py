"""RetinaNet with a SpineNet backbone (Lin et al. 2017; SpineNet paper Sec. 5)."""

from __future__ import annotations

import dataclasses
import inspect

import keras

from spinenet_tf import specs as specs_lib
from spinenet_tf.models.base import (
    BackboneAndHead,
    as_dataclass,
    backbone_anchors,
    flatten_levels,
    image_hw,
    split_overrides,
)
from spinenet_tf.models.heads import RetinaNetHead
from spinenet_tf.models.spinenet import SpineNet, build_backbone
from spinenet_tf.ops.anchors import AnchorConfig
from spinenet_tf.ops.postprocess import DetectionConfig, generate_detections
from spinenet_tf.ops.targets import AnchorLabeler, LossConfig, MatchingConfig, retinanet_losses


@keras.saving.register_keras_serializable(package="spinenet_tf")
class RetinaNet(BackboneAndHead):
    """A one-stage detector on a fixed input size (static shapes for XLA and TPUs).

    Calling the model returns raw outputs {"class_logits": [B, N, num_classes],
    "box_deltas": [B, N, 4]} over the N anchors of all levels; `model.predict` and `detect`
    return decoded detections {"boxes", "scores", "classes", "num_detections"} with boxes
    in input pixels (ymin, xmin, ymax, xmax). Class 0 is background.

    Training (`compile` + `fit`) takes y as either targets of `model.labeler` (an
    `AnchorLabeler`: the input pipeline matches on the host, `labeler.matches`) or padded
    ground truth {"boxes": [B, M, 4] in input pixels, "classes": [B, M] (-1 pads),
    optionally "is_crowd": [B, M]}, matched to anchors in the graph. `matching`
    (`MatchingConfig`) follows SpineNet's own code by default: positive at IoU >= 0.5,
    negative below (no ignore band; the RetinaNet paper's band is unmatched_iou=0.4), crowd
    boxes dropped unless crowd_ignore_ioa is set. `loss` (`LossConfig`) sets the focal and box
    losses, `detection` (`DetectionConfig`) the decoding, `anchor` (`AnchorConfig`) the anchors.
    """

    def __init__(
        self,
        backbone: SpineNet,
        num_classes: int,
        image_size=(640, 640),
        anchor: AnchorConfig | dict | None = None,
        head_num_convs: int = 4,
        head_num_filters: int = 256,
        head_separable: bool = False,
        prior_prob: float = 0.01,
        matching: MatchingConfig | dict | None = None,
        loss: LossConfig | dict | None = None,
        detection: DetectionConfig | dict | None = None,
        **kwargs,
    ):
        if isinstance(backbone, dict):
            backbone = keras.saving.deserialize_keras_object(backbone)
        image_size = image_hw(image_size)
        anchor = backbone_anchors(backbone, anchor)
        detection = as_dataclass(DetectionConfig, detection)
        matching = as_dataclass(MatchingConfig, matching)
        loss = as_dataclass(LossConfig, loss)
        config = {
            k: v
            for k, v in locals().items()
            if k in inspect.signature(RetinaNet.__init__).parameters
            and k not in ("self", "kwargs", "backbone")
        }
        head = RetinaNetHead(
            num_classes,
            anchor.num_anchors_per_location,
            anchor.min_level,
            anchor.max_level,
            num_convs=head_num_convs,
            num_filters=head_num_filters,
            use_separable_conv=head_separable,
            activation=backbone.activation,
            prior_prob=prior_prob,
            settings=backbone.conv_settings,
            name="head",
        )
        image = keras.Input(shape=(*image_size, 3), name="image")
        class_logits, box_deltas = head(backbone(image))
        outputs = {
            "class_logits": flatten_levels(class_logits, num_classes),
            "box_deltas": flatten_levels(box_deltas, 4),
        }
        super().__init__(inputs=image, outputs=outputs, **kwargs)
        self.backbone = backbone
        self.head = head
        self.num_classes = num_classes
        self.image_size = image_size
        self.anchor_config = anchor
        self.detection_config = detection
        self.loss_config = loss
        self.anchor_boxes = anchor.boxes(image_size)
        self.level_sizes = anchor.level_sizes(image_size)
        self.labeler = AnchorLabeler(self.anchor_boxes, matching)
        self._model_config = {
            **config,
            "image_size": list(image_size),
            "anchor": anchor.to_config(),
            "matching": dataclasses.asdict(matching),
            "loss": dataclasses.asdict(loss),
            "detection": dataclasses.asdict(detection),
        }

    def losses_from(self, y, y_pred, normalizer=None) -> dict:
        """Focal, box and total loss for y (anything `labeler.targets` takes); see
        `retinanet_losses` for `normalizer`."""
        return retinanet_losses(
            y_pred["class_logits"],
            y_pred["box_deltas"],
            self.labeler.targets(y),
            self.loss_config,
            normalizer=normalizer,
        )

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return self.with_weight_decay(self.losses_from(y, y_pred)["total_loss"])

    def detect(self, outputs, valid_hw=None) -> dict:
        """Decodes raw outputs (of `self(images)`) into detections; `valid_hw` [B, 2] is the
        size of each image inside the padded input (boxes are clipped to it before NMS)."""
        return generate_detections(
            outputs["class_logits"],
            outputs["box_deltas"],
            self.anchor_boxes,
            self.level_sizes,
            self.image_size,
            self.detection_config,
            valid_hw=valid_hw,
        )

    def postprocess(self, outputs):
        return self.detect(outputs)


WEIGHT_DECAY = 4e-5


def build_retinanet(
    model_id: str,
    num_classes: int,
    image_size=None,
    weight_decay: float = WEIGHT_DECAY,
    **overrides,
) -> RetinaNet:
    """Builds RetinaNet-SpineNet `model_id` with its paper / Model Garden head and anchors.

    `image_size` defaults to the paper's size for the model id. `overrides` may hold
    RetinaNet arguments (head_num_filters; matching, loss, detection and anchor as dicts of
    their config's fields, merged over the defaults, e.g. matching={'unmatched_iou': 0.4})
    and backbone arguments (activation, init_stochastic_depth_rate, ...). Convolution kernels
    get `weight_decay` (the paper's 4e-5; the SpineNet-Mobile recipes use 3e-5) as
    L2(weight_decay / 2), whose gradient is weight_decay * w (Model Garden's
    l2(weight_decay / 2)), unless `kernel_regularizer` is given.
    """
    head_args, overrides = split_overrides(overrides, RetinaNet, weight_decay)
    scaling = specs_lib.get_scaling(model_id)
    image_size = image_hw(image_size or specs_lib.PAPER_IMAGE_SIZES[scaling.model_id])
    name = head_args.pop("name", f"retinanet_{model_id.lower().replace('-', '_')}")
    backbone = build_backbone(scaling, input_shape=(*image_size, 3), **overrides)
    anchor = head_args.pop("anchor", None)
    if not isinstance(anchor, AnchorConfig):
        anchor = AnchorConfig(
            **{
                "min_level": backbone.min_level,
                "max_level": backbone.max_level,
                "anchor_size": scaling.anchor_size,
                **(anchor or {}),
            }
        )
    kwargs = dict(
        head_num_convs=scaling.head_num_convs,
        head_num_filters=scaling.head_num_filters,
        head_separable=scaling.head_separable,
        anchor=anchor,
    )
    kwargs.update(head_args)
    return RetinaNet(backbone, num_classes, image_size, name=name, **kwargs)
