"""RetinaNet with a SpineNet backbone (Lin et al. 2017; SpineNet paper Sec. 5)."""

from __future__ import annotations

import dataclasses
import inspect

import keras
from keras import ops

from spinenet_tf import specs as specs_lib
from spinenet_tf.layers.common import ConvSettings
from spinenet_tf.models.heads import RetinaNetHead
from spinenet_tf.models.spinenet import SpineNet, build_backbone
from spinenet_tf.ops.anchors import AnchorConfig
from spinenet_tf.ops.postprocess import DetectionConfig, generate_detections
from spinenet_tf.ops.targets import (
    build_targets,
    match_anchors,
    retinanet_losses,
    targets_from_matches,
)


@keras.saving.register_keras_serializable(package="spinenet_tf")
class RetinaNet(keras.Model):
    """A one-stage detector on a fixed input size (static shapes for XLA and TPUs).

    Calling the model returns raw outputs {"class_logits": [B, N, num_classes],
    "box_deltas": [B, N, 4]} over the N anchors of all levels; `model.predict` and `detect`
    return decoded detections {"boxes", "scores", "classes", "num_detections"} with boxes
    in input pixels (ymin, xmin, ymax, xmax). Class 0 is background.

    Training (`compile` + `fit`) takes y as either the targets of
    `spinenet_tf.ops.targets.build_targets` (the input pipeline's job on TPUs) or padded
    ground truth {"boxes": [B, M, 4] in input pixels, "classes": [B, M] (-1 pads),
    optionally "is_crowd": [B, M]}, matched to anchors in the graph. Matching follows
    SpineNet's own code (see `spinenet_tf.ops.targets.build_targets`): positive at IoU >=
    `match_iou`, negative below `unmatched_iou` (both 0.5: no ignore band; the RetinaNet
    paper's band is unmatched_iou=0.4), crowd boxes dropped unless `crowd_ignore_ioa` is set.
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
        match_iou: float = 0.5,
        unmatched_iou: float = 0.5,
        crowd_ignore_ioa: float | None = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 1.5,
        huber_delta: float = 0.1,
        box_loss_weight: float = 50.0,
        train_background: bool = False,
        detection: DetectionConfig | dict | None = None,
        **kwargs,
    ):
        if isinstance(backbone, dict):
            backbone = keras.saving.deserialize_keras_object(backbone)
        image_size = _hw(image_size)
        anchor = _dataclass(
            AnchorConfig, anchor, min_level=backbone.min_level, max_level=backbone.max_level
        )
        if (anchor.min_level, anchor.max_level) != (backbone.min_level, backbone.max_level):
            raise ValueError(
                f"anchor levels {anchor.min_level}-{anchor.max_level} differ from the "
                f"backbone's {backbone.min_level}-{backbone.max_level}"
            )
        detection = _dataclass(DetectionConfig, detection)
        config = {
            k: v
            for k, v in locals().items()
            if k in inspect.signature(RetinaNet.__init__).parameters
            and k not in ("self", "kwargs", "backbone")
        }
        bb = backbone.get_config()
        head = RetinaNetHead(
            num_classes,
            anchor.num_anchors_per_location,
            anchor.min_level,
            anchor.max_level,
            num_convs=head_num_convs,
            num_filters=head_num_filters,
            use_separable_conv=head_separable,
            activation=bb["activation"],
            prior_prob=prior_prob,
            settings=ConvSettings(
                kernel_regularizer=bb["kernel_regularizer"],
                norm_momentum=bb["norm_momentum"],
                norm_epsilon=bb["norm_epsilon"],
                use_sync_bn=bb["use_sync_bn"],
            ),
            name="head",
        )
        image = keras.Input(shape=(*image_size, 3), name="image")
        class_logits, box_deltas = head(backbone(image))
        outputs = {
            "class_logits": _flatten(class_logits, num_classes),
            "box_deltas": _flatten(box_deltas, 4),
        }
        super().__init__(inputs=image, outputs=outputs, **kwargs)
        self.backbone = backbone
        self.head = head
        self.num_classes = num_classes
        self.image_size = image_size
        self.anchor_config = anchor
        self.detection_config = detection
        self.anchor_boxes = anchor.boxes(image_size)
        self.level_sizes = anchor.level_sizes(image_size)
        self._retinanet_config = {
            **config,
            "image_size": list(image_size),
            "anchor": anchor.to_config(),
            "detection": dataclasses.asdict(detection),
        }

    def targets(self, y) -> dict:
        """Training targets from y: passed through if already built, encoded from host-side
        `anchor_matches`, or matched here from padded ground truth."""
        if "cls_targets" in y:
            return y
        if "boxes" not in y or "classes" not in y:
            raise ValueError(
                "RetinaNet targets need either cls_targets / box_targets / cls_weights / "
                f"box_weights or padded boxes / classes; got keys {sorted(y)}"
            )
        if "anchor_matches" in y:
            return targets_from_matches(
                y["anchor_matches"], self.anchor_boxes, y["boxes"], y["classes"]
            )
        return build_targets(self.anchor_boxes, y["boxes"], y["classes"], **self._match_args(y))

    def anchor_matches(self, y) -> dict:
        """{"anchor_matches": [..., N]} for padded ground truth y: the input pipeline's share of
        the targets (see `spinenet_tf.ops.targets.match_anchors`)."""
        return {
            "anchor_matches": match_anchors(
                self.anchor_boxes, y["boxes"], y["classes"], **self._match_args(y)
            )
        }

    def _match_args(self, y) -> dict:
        c = self._retinanet_config
        return {
            "is_crowd": y.get("is_crowd"),
            "match_iou": c["match_iou"],
            "unmatched_iou": c["unmatched_iou"],
            "crowd_ignore_ioa": c["crowd_ignore_ioa"],
        }

    def losses_from(self, y, y_pred, normalizer=None) -> dict:
        """Focal, box and total loss; see `retinanet_losses` for `normalizer`."""
        c = self._retinanet_config
        return retinanet_losses(
            y_pred["class_logits"],
            y_pred["box_deltas"],
            self.targets(y),
            alpha=c["focal_alpha"],
            gamma=c["focal_gamma"],
            huber_delta=c["huber_delta"],
            box_loss_weight=c["box_loss_weight"],
            normalizer=normalizer,
            train_background=c["train_background"],
        )

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = self.losses_from(y, y_pred)["total_loss"]
        if self.losses:  # weight decay from the kernel regularisers
            loss = loss + ops.cast(ops.sum(self.losses), loss.dtype)
        return loss

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

    def predict_step(self, data):
        x = data[0] if isinstance(data, (tuple, list)) else data
        return self.detect(self(x, training=False))

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            **self._retinanet_config,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _hw(image_size) -> tuple[int, int]:
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"image_size {image_size!r} must be N or (height, width)")
    return int(hw[0]), int(hw[1])


def _dataclass(cls, value, **defaults):
    if isinstance(value, cls):
        return value
    return cls(**{**defaults, **(value or {})})


def _flatten(per_level: dict, channels: int):
    """[B, H, W, A * C] per level -> [B, sum(H * W * A), C], in anchor order."""
    flat = []
    for key in sorted(per_level, key=lambda k: int(k[1:])):
        x = per_level[key]
        h, w, c = x.shape[1:]
        flat.append(ops.reshape(x, (-1, h * w * (c // channels), channels)))
    return ops.concatenate(flat, axis=1)


WEIGHT_DECAY = 4e-5
_RETINANET_ARGS = set(inspect.signature(RetinaNet.__init__).parameters) - {
    "self",
    "kwargs",
    "backbone",
}


def build_retinanet(
    model_id: str,
    num_classes: int,
    image_size=None,
    weight_decay: float = WEIGHT_DECAY,
    **overrides,
) -> RetinaNet:
    """Builds RetinaNet-SpineNet `model_id` with its paper / Model Garden head and anchors.

    `image_size` defaults to the paper's size for the model id; `overrides` may hold
    RetinaNet arguments (head_num_filters, detection, ...) and backbone arguments
    (activation, init_stochastic_depth_rate, ...). Convolution kernels get `weight_decay`
    (the paper's 4e-5; the SpineNet-Mobile recipes use 3e-5) as L2(weight_decay / 2), whose
    gradient is weight_decay * w (Model Garden's l2(weight_decay / 2)), unless
    `kernel_regularizer` is given.
    """
    if weight_decay:
        overrides.setdefault("kernel_regularizer", keras.regularizers.L2(weight_decay / 2))
    scaling = specs_lib.get_scaling(model_id)
    image_size = _hw(image_size or specs_lib.PAPER_IMAGE_SIZES[scaling.model_id])
    head_args = {k: overrides.pop(k) for k in list(overrides) if k in _RETINANET_ARGS}
    name = overrides.pop("name", f"retinanet_{model_id.lower().replace('-', '_')}")
    backbone = build_backbone(model_id, input_shape=(*image_size, 3), **overrides)
    kwargs = dict(
        head_num_convs=scaling.head_num_convs,
        head_num_filters=scaling.head_num_filters,
        head_separable=scaling.head_separable,
        anchor=AnchorConfig(
            min_level=backbone.min_level,
            max_level=backbone.max_level,
            anchor_size=scaling.anchor_size,
        ),
    )
    kwargs.update(head_args)
    return RetinaNet(backbone, num_classes, image_size, name=name, **kwargs)
