"""Mask R-CNN with a SpineNet backbone (He et al. 2017; SpineNet paper Sec. 5, protocol B)."""

from __future__ import annotations

import dataclasses
import inspect

import keras
import tensorflow as tf

from spinenet_tf import specs as specs_lib
from spinenet_tf.models.base import (
    BackboneModel,
    as_dataclass,
    backbone_anchors,
    flatten_levels,
    image_hw,
    split_overrides,
)
from spinenet_tf.models.rcnn_heads import BoxHead, MaskHead, RPNHead
from spinenet_tf.models.retinanet import WEIGHT_DECAY
from spinenet_tf.models.spinenet import SpineNet, build_backbone
from spinenet_tf.ops.anchors import AnchorConfig
from spinenet_tf.ops.postprocess import DetectionConfig
from spinenet_tf.ops.proposals import ProposalConfig, detect_from_rois, generate_proposals
from spinenet_tf.ops.rcnn_losses import RCNNLossConfig, maskrcnn_losses
from spinenet_tf.ops.rcnn_targets import (
    ROISamplerConfig,
    RPNTargetConfig,
    mask_targets,
    rpn_targets,
    salted,
    sample_rois,
)
from spinenet_tf.ops.roi_align import multilevel_roi_align

_CONFIGS = {
    "anchor": AnchorConfig,
    "proposal": ProposalConfig,
    "rpn_targets": RPNTargetConfig,
    "sampler": ROISamplerConfig,
    "loss": RCNNLossConfig,
    "detection": DetectionConfig,
}


@keras.saving.register_keras_serializable(package="spinenet_tf")
class MaskRCNN(BackboneModel, keras.Model):
    """A two-stage instance segmenter on a fixed input size, static shapes throughout.

    Inference (`model(images)`, `model.predict`, or `model({"images", "valid_hw": [B, 2]
    each image's height and width inside the padded input})`) returns {"boxes": [B, D, 4]
    input pixels, "scores": [B, D], "classes": [B, D] (1-based), "num_detections": [B],
    "masks": [B, D, 28, 28] probabilities inside each box}, D = detection.max_detections.

    Training (`model(inputs, training=True)`) takes inputs {"images", "boxes": [B, M, 4]
    input pixels, "classes": [B, M] (-1 pads), "masks": [B, M, h, w] each box's mask
    cropped to its box, optionally prebuilt RPN targets (`rpn_targets`) and per-image
    sampling seeds "seed" [B, 2]} and returns what
    `losses_from` needs: RPN outputs and targets, the sampled ROIs' class / box outputs and
    targets, mask logits and targets. `fit` takes (images, ground truth dict).

    Configs (dataclasses, or dicts of their fields): `anchor` (3 per location), `proposal`,
    `rpn_targets`, `sampler`, `loss`, `detection`; `seed` seeds the samplers.
    """

    def __init__(
        self,
        backbone: SpineNet,
        num_classes: int,
        image_size=(640, 640),
        anchor: AnchorConfig | dict | None = None,
        rpn_num_convs: int = 1,
        rpn_num_filters: int = 256,
        head_num_convs: int = 4,
        head_num_filters: int = 256,
        head_fc_dims: int = 1024,
        mask_num_convs: int = 4,
        mask_num_filters: int = 256,
        roi_size: int = 7,
        mask_roi_size: int = 14,
        proposal: ProposalConfig | dict | None = None,
        rpn_targets: RPNTargetConfig | dict | None = None,
        sampler: ROISamplerConfig | dict | None = None,
        loss: RCNNLossConfig | dict | None = None,
        detection: DetectionConfig | dict | None = None,
        seed: int | None = None,
        **kwargs,
    ):
        if isinstance(backbone, dict):
            backbone = keras.saving.deserialize_keras_object(backbone)
        super().__init__(**kwargs)
        image_size = image_hw(image_size)
        levels = dict(min_level=backbone.min_level, max_level=backbone.max_level)
        # One scale: 3 anchors a location, as tensorflow/tpu and Model Garden's factory.
        anchor = backbone_anchors(backbone, anchor, num_scales=1)
        config = {
            k: v
            for k, v in locals().items()
            if k in inspect.signature(MaskRCNN.__init__).parameters
            and k not in ("self", "kwargs", "backbone", *_CONFIGS)
        }
        configs = dict(
            anchor=anchor,
            proposal=as_dataclass(ProposalConfig, proposal),
            rpn_targets=as_dataclass(RPNTargetConfig, rpn_targets),
            sampler=as_dataclass(ROISamplerConfig, sampler),
            loss=as_dataclass(RCNNLossConfig, loss),
            # Over all ROIs of each class, as Model Garden's v2 decoder for Mask R-CNN.
            detection=as_dataclass(DetectionConfig, detection, pre_nms="per_class"),
        )
        self._model_config = {
            **config,
            "image_size": list(image_size),
            **{k: dataclasses.asdict(v) for k, v in configs.items()},
            "anchor": anchor.to_config(),
        }
        for key, value in configs.items():
            setattr(self, f"{key}_config", value)
        self.backbone = backbone
        self.num_classes, self.image_size = int(num_classes), image_size
        self.roi_size, self.mask_roi_size = int(roi_size), int(mask_roi_size)
        settings, act = backbone.conv_settings, backbone.activation
        self.rpn_head = RPNHead(
            anchor.num_anchors_per_location,
            **levels,
            num_convs=rpn_num_convs,
            num_filters=rpn_num_filters,
            activation=act,
            settings=settings,
            name="rpn_head",
        )
        self.box_head = BoxHead(
            num_classes,
            head_num_convs,
            head_num_filters,
            head_fc_dims,
            activation=act,
            settings=settings,
            name="box_head",
        )
        self.mask_head = MaskHead(
            num_classes,
            mask_num_convs,
            mask_num_filters,
            activation=act,
            settings=settings,
            name="mask_head",
        )
        channels = backbone.endpoints_num_filters
        self.rpn_head.build({f"P{lv}": (None, None, None, channels) for lv in anchor.levels})
        self.box_head.build((None, None, roi_size, roi_size, channels))
        self.mask_head.build(((None, None, mask_roi_size, mask_roi_size, channels), (None, None)))
        self.seed_generator = keras.random.SeedGenerator(seed, name="sampler_seed")
        self.anchor_boxes = anchor.boxes(image_size)
        self.level_sizes = anchor.level_sizes(image_size)
        self.built = True

    def _next_seed(self):
        return tf.cast(self.seed_generator.next(), tf.int64)

    def call(self, inputs, training=None):
        ground_truth = inputs if isinstance(inputs, dict) else {}
        if training and "boxes" not in ground_truth:
            raise ValueError(
                "training needs inputs {'images', 'boxes', 'classes', 'masks'}, got "
                + (f"a dict of {sorted(ground_truth)}" if ground_truth else "images")
            )
        images = ground_truth["images"] if ground_truth else inputs
        # Each image's own (height, width) inside the padded input, if given: proposals and
        # detections are clipped to it, not to the padding.
        valid_hw = ground_truth.get("valid_hw")
        features = self.backbone(images, training=training)
        scores, deltas = self.rpn_head(features, training=training)
        rpn = {
            "rpn_scores": flatten_levels(scores, 1)[..., 0],
            "rpn_deltas": flatten_levels(deltas, 4),
        }
        pre_nms_top_k, num_proposals = self.proposal_config.settings(bool(training))
        rois, _ = generate_proposals(
            rpn["rpn_scores"],
            rpn["rpn_deltas"],
            self.anchor_boxes,
            self.level_sizes,
            self.image_size,
            pre_nms_top_k,
            num_proposals,
            self.proposal_config.iou_threshold,
            valid_hw=valid_hw,
        )
        if training:
            return {**rpn, **self._train_heads(features, rois, ground_truth, training)}
        return self._detect(features, rois, valid_hw)

    def _train_heads(self, features, rois, gt, training):
        out = {}
        if "seed" in gt:  # per image, from the data pipeline: the same draws on any replica
            rpn_seed, sampler_seed = salted(gt["seed"], 1), salted(gt["seed"], 2)
        else:
            rpn_seed, sampler_seed = self._next_seed(), self._next_seed()
        if "rpn_score_targets" in gt:
            out.update(
                {k: gt[k] for k in ("rpn_score_targets", "rpn_box_targets", "rpn_box_weights")}
            )
        else:
            out.update(
                rpn_targets(
                    self.anchor_boxes,
                    gt["boxes"],
                    gt["classes"],
                    rpn_seed,
                    self.rpn_targets_config,
                )
            )
        samples = sample_rois(rois, gt["boxes"], gt["classes"], sampler_seed, self.sampler_config)
        roi_features = multilevel_roi_align(features, samples["rois"], self.roi_size)
        out["class_logits"], out["box_deltas"] = self.box_head(roi_features, training=training)
        out.update(classes=samples["classes"], box_targets=samples["box_targets"])
        masks = mask_targets(
            samples, gt["boxes"], gt["masks"], self.sampler_config.num_masks, 2 * self.mask_roi_size
        )
        mask_features = multilevel_roi_align(features, masks["mask_rois"], self.mask_roi_size)
        out["mask_logits"] = self.mask_head(
            (mask_features, masks["mask_classes"]), training=training
        )
        out.update(mask_classes=masks["mask_classes"], mask_targets=masks["mask_targets"])
        return out

    def _detect(self, features, rois, valid_hw=None):
        roi_features = multilevel_roi_align(features, rois, self.roi_size)
        class_logits, box_deltas = self.box_head(roi_features, training=False)
        detections = detect_from_rois(
            class_logits, box_deltas, rois, self.image_size, self.detection_config, valid_hw
        )
        mask_features = multilevel_roi_align(features, detections["boxes"], self.mask_roi_size)
        logits = self.mask_head((mask_features, detections["classes"]), training=False)
        return {**detections, "masks": tf.sigmoid(tf.cast(logits, tf.float32))}

    def losses_from(self, outputs, global_sum=None) -> dict:
        """The losses (`maskrcnn_losses`) of training outputs; with `global_sum` (a sum over
        replicas), this replica's share of the global batch's losses."""
        return maskrcnn_losses(
            outputs,
            outputs,
            self.level_sizes,
            self.rpn_targets_config.num_samples,
            self.loss_config,
            global_sum,
        )

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return self.with_weight_decay(self.losses_from(y_pred)["total_loss"])

    def train_step(self, data):
        # fit's (images, ground truth): the training forward needs both.
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if not isinstance(x, dict):
            x = {"images": x, **(y or {})}
        return super().train_step((x, y, sample_weight))


# Heads, anchors and activation of the tensorflow/tpu Mask R-CNN configs
# (configs/spinenet/spinenet*_mrcnn.yaml) where they differ from the defaults.
_MODEL_ROWS = {
    "49S": dict(rpn_num_filters=128, head_num_filters=128, head_fc_dims=512, mask_num_filters=128),
    "190": dict(
        rpn_num_convs=7,
        rpn_num_filters=384,
        head_num_convs=7,
        head_num_filters=384,
        mask_num_convs=7,
        mask_num_filters=384,
        anchor={"anchor_size": 5.0},
    ),
}
_IMAGE_SIZES = {"190": 1536}


def build_maskrcnn(
    model_id: str,
    num_classes: int,
    image_size=None,
    weight_decay: float = WEIGHT_DECAY,
    **overrides,
) -> MaskRCNN:
    """Builds Mask R-CNN-SpineNet `model_id` as the paper trained it (protocol B: ReLU
    except SpineNet-190's swish, 3 anchors per location of size 3, heads of the
    tensorflow/tpu configs).

    `image_size` defaults to the paper's size for the model id. `overrides` may hold
    MaskRCNN arguments (configs as dicts of their fields, merged over the defaults) and
    backbone arguments. Kernels get L2(weight_decay / 2) unless `kernel_regularizer` is
    given, as `build_retinanet`.
    """
    head_args, overrides = split_overrides(overrides, MaskRCNN, weight_decay)
    scaling = specs_lib.get_scaling(model_id)
    size = _IMAGE_SIZES.get(scaling.model_id) or specs_lib.PAPER_IMAGE_SIZES[scaling.model_id]
    image_size = image_hw(image_size or size)
    row = dict(_MODEL_ROWS.get(scaling.model_id, {}))
    for key in _CONFIGS:
        if isinstance(row.get(key), dict) and isinstance(head_args.get(key), dict):
            head_args[key] = {**row[key], **head_args[key]}
    overrides.setdefault("activation", "swish" if scaling.model_id == "190" else "relu")
    name = head_args.pop("name", f"maskrcnn_{model_id.lower().replace('-', '_')}")
    backbone = build_backbone(scaling, input_shape=(*image_size, 3), **overrides)
    return MaskRCNN(backbone, num_classes, image_size, name=name, **{**row, **head_args})
