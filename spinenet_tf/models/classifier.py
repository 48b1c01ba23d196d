"""SpineNet image classifiers: the SpineNet paper's ImageNet and iNaturalist models, as
tensorflow/tpu's classification model builds them.

The classifier is the detection backbone (P3-P7 endpoints, 256 wide; 512 for SpineNet-190)
with tensorflow/tpu's `ClassificationHead`: starting from P7, each level is upsampled
nearest-neighbour to the next finer level's size and added to it, the sum is divided by the
number of levels, averaged over space and mapped to logits by a dense layer initialised
N(0, 0.01). Model Garden's classifier uses P7 only (`aggregation='top'`) and cannot build
SpineNet at 224 px; this one can, at any size.
"""

from __future__ import annotations

import inspect

import keras
from keras import ops

from spinenet_tf import specs as specs_lib
from spinenet_tf.layers.common import nearest_upsample
from spinenet_tf.models.base import BackboneAndHead, image_hw
from spinenet_tf.models.spinenet import BACKBONE_ARGS, SpineNet, build_backbone

AGGREGATIONS = ("all", "top")


@keras.saving.register_keras_serializable(package="spinenet_tf")
class ClassificationHead(keras.layers.Layer):
    """Backbone endpoints {"P3": ..., "P7": ...} -> class logits [B, num_classes] (float32).

    Args:
        num_classes: outputs of the dense layer (ImageNet: 1001, class 0 unused).
        min_level, max_level: the endpoints aggregated.
        aggregation: 'all' (tensorflow/tpu's SpineNet recipe: P7 upsampled into P6, the sum
            into P5, ... down to P3, divided by the number of levels) or 'top' (P7 only).
        dropout_rate: dropout before the dense layer, in training.
        kernel_regularizer: of the dense kernel (the bias is not regularised).
    """

    def __init__(
        self,
        num_classes: int,
        min_level: int = 3,
        max_level: int = 7,
        aggregation: str = "all",
        dropout_rate: float = 0.0,
        kernel_regularizer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation {aggregation!r} must be one of {AGGREGATIONS}")
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate {dropout_rate} must be in [0, 1)")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.min_level, self.max_level = int(min_level), int(max_level)
        self.aggregation = aggregation
        self.dropout_rate = float(dropout_rate)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.dropout = keras.layers.Dropout(dropout_rate, name="dropout")
        # tf.layers.dense's initialisers in tensorflow/tpu: N(0, 0.01) kernel (not truncated),
        # zero bias. Logits in float32 under mixed precision, as tensorflow/tpu casts them.
        self.dense = keras.layers.Dense(
            num_classes,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
            bias_initializer="zeros",
            kernel_regularizer=self.kernel_regularizer,
            dtype="float32",
            name="dense",
        )

    def aggregate(self, features: dict):
        """The [B, H3, W3, C] (or, for 'top', [B, H7, W7, C]) map that is pooled."""
        x = features[f"P{self.max_level}"]
        if self.aggregation == "top":
            return x
        for level in range(self.max_level - 1, self.min_level - 1, -1):
            finer = features[f"P{level}"]
            # Levels are ceil(size / 2**level), so the finer map is 2n or 2n - 1 wide: repeat
            # twice and crop. That is TF1 resize_nearest_neighbor's index floor(d * n / out),
            # tensorflow/tpu's, also for 224 px's 4 -> 7 (rows 0,0,1,1,2,2,3); TF2's
            # half-pixel resize picks 0,0,1,2,2,3,3.
            x = nearest_upsample(x, 2, _hw(finer)) + finer
        return x / float(self.max_level - self.min_level + 1)

    def call(self, features, training=None):
        x = ops.mean(self.aggregate(features), axis=(1, 2))
        x = self.dropout(x, training=training)
        return self.dense(x)

    def compute_output_shape(self, input_shape):
        first = next(iter(input_shape.values()))
        return (first[0], self.num_classes)

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "min_level": self.min_level,
            "max_level": self.max_level,
            "aggregation": self.aggregation,
            "dropout_rate": self.dropout_rate,
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
        }


def _hw(x):
    static = x.shape[1:3]
    if all(isinstance(d, int) for d in static):
        return tuple(static)
    return tuple(ops.shape(x)[1:3])


@keras.saving.register_keras_serializable(package="spinenet_tf")
class Classifier(BackboneAndHead):
    """A SpineNet backbone and a `ClassificationHead` on a fixed input size.

    Calling the model returns logits [B, num_classes] (float32); `model.predict` returns
    {"probabilities": [B, num_classes], "top_k_classes": [B, k] int32, "top_k_scores":
    [B, k]} with k = min(5, num_classes). `compile` + `fit` take integer labels [B]: unless
    compiled with a loss of one's own, the loss is softmax cross-entropy with
    `label_smoothing` (targets y * (1 - s) + s / num_classes, tensorflow/tpu's), plus the
    kernel regularisers' weight decay.
    """

    def __init__(
        self,
        backbone: SpineNet,
        num_classes: int,
        image_size=(224, 224),
        aggregation: str = "all",
        dropout_rate: float = 0.0,
        label_smoothing: float = 0.1,
        top_k: int = 5,
        **kwargs,
    ):
        if isinstance(backbone, dict):
            backbone = keras.saving.deserialize_keras_object(backbone)
        image_size = image_hw(image_size)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing {label_smoothing} must be in [0, 1)")
        config = {
            k: v
            for k, v in locals().items()
            if k in inspect.signature(Classifier.__init__).parameters
            and k not in ("self", "kwargs", "backbone")
        }
        head = ClassificationHead(
            num_classes,
            backbone.min_level,
            backbone.max_level,
            aggregation=aggregation,
            dropout_rate=dropout_rate,
            kernel_regularizer=backbone.conv_settings.regularizer(),
            name="head",
        )
        image = keras.Input(shape=(*image_size, 3), name="image")
        super().__init__(inputs=image, outputs=head(backbone(image)), **kwargs)
        self.backbone = backbone
        self.head = head
        self.num_classes = int(num_classes)
        self.image_size = image_size
        self.label_smoothing = float(label_smoothing)
        self.top_k = min(int(top_k), self.num_classes)
        self._model_config = {**config, "image_size": list(image_size)}

    def loss_from(self, labels, logits, sample_weight=None):
        """Per-example label-smoothed softmax cross-entropy of integer labels [B]."""
        one_hot = ops.one_hot(ops.cast(ops.reshape(labels, (-1,)), "int32"), self.num_classes)
        losses = keras.losses.categorical_crossentropy(
            one_hot,
            ops.cast(logits, "float32"),
            from_logits=True,
            label_smoothing=self.label_smoothing,
        )
        if sample_weight is not None:
            losses = losses * ops.cast(ops.reshape(sample_weight, (-1,)), losses.dtype)
        return losses

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if getattr(self, "_compile_loss", None) is not None:  # compiled with its own loss
            return super().compute_loss(x, y, y_pred, sample_weight, training)
        return self.with_weight_decay(ops.mean(self.loss_from(y, y_pred, sample_weight)))

    def classify(self, logits) -> dict:
        """Logits -> probabilities and the top-k classes with their probabilities."""
        probabilities = ops.softmax(ops.cast(logits, "float32"), axis=-1)
        scores, classes = ops.top_k(probabilities, self.top_k)
        return {
            "probabilities": probabilities,
            "top_k_classes": ops.cast(classes, "int32"),
            "top_k_scores": scores,
        }

    def postprocess(self, outputs):
        return self.classify(outputs)


WEIGHT_DECAY = 1e-4
# tensorflow/tpu's SpineNet ImageNet recipe (the paper's better results, with swish,
# stochastic depth and label smoothing): swish, stochastic depth 0.2, batch norm momentum 0.9
# and epsilon 1e-5.
RECIPE_BACKBONE = {
    "activation": "swish",
    "init_stochastic_depth_rate": 0.2,
    "norm_momentum": 0.9,
    "norm_epsilon": 1e-5,
}
_CLASSIFIER_ARGS = {"aggregation", "dropout_rate", "label_smoothing", "top_k"}


def build_classifier(
    model_id: str,
    num_classes: int = 1001,
    image_size=224,
    weight_decay: float = WEIGHT_DECAY,
    **overrides,
) -> Classifier:
    """Builds the SpineNet-`model_id` classifier of tensorflow/tpu's ImageNet recipe.

    The backbone takes `RECIPE_BACKBONE` and, for the residual family, the 15 searched blocks
    of the paper (tensorflow/tpu), so block i's stochastic depth rate is 0.2 * (i + 1) / 15;
    Model Garden's 16th block feeds no output at levels 3-7 and changes no parameter.
    Convolution and dense kernels get L2(weight_decay / 2), i.e. loss += weight_decay *
    sum(w**2) / 2 (tensorflow/tpu's 1e-4 * tf.nn.l2_loss), unless `kernel_regularizer` is
    given. `overrides` may hold Classifier arguments (aggregation, dropout_rate,
    label_smoothing, top_k) and backbone arguments (activation, block_specs, ...).
    """
    scaling = specs_lib.get_scaling(model_id)
    if weight_decay:
        overrides.setdefault("kernel_regularizer", keras.regularizers.L2(weight_decay / 2))
    head_args = {k: overrides.pop(k) for k in list(overrides) if k in _CLASSIFIER_ARGS}
    name = overrides.pop("name", f"classifier_{model_id.lower().replace('-', '_')}")
    unknown = sorted(set(overrides) - BACKBONE_ARGS)
    if unknown:
        raise ValueError(
            f"unknown model setting(s) {unknown}; the classifier takes "
            f"{sorted(_CLASSIFIER_ARGS)} and the backbone {sorted(BACKBONE_ARGS)}"
        )
    backbone_args = dict(RECIPE_BACKBONE)
    if scaling.family == "spinenet":
        backbone_args["block_specs"] = specs_lib.SPINENET_BLOCK_SPECS[:15]
    else:  # SpineNet-Mobile has no ImageNet recipe in either reference: its own activation
        backbone_args["activation"] = scaling.activation
    backbone_args.update(overrides)
    image_size = image_hw(image_size)
    backbone = build_backbone(scaling, input_shape=(*image_size, 3), **backbone_args)
    return Classifier(backbone, num_classes, image_size, name=name, **head_args)
