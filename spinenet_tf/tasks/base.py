"""A task: everything that differs between heads, behind one interface.

The trainer owns the loop (strategy, steps, optimiser, checkpoints, summaries) and asks its
task for the model, the input parser, the training targets and losses, the evaluation and
the drawings; export and predict ask it for what a SavedModel serves and what a prediction
draws. A new head (Mask R-CNN, a classifier, a user's own) is a new Task, bound in gin as
`ExperimentConfig.task = @MyTask()`; the trainer does not change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import tensorflow as tf
from PIL import Image

from spinenet_tf.data import ops
from spinenet_tf.data.decoders import Decoders, detection_decoders

INPUT_TYPES = ("image_tensor", "image_bytes", "tf_example")
# The one input of every signature is named as Model Garden names it, so clients of a
# Model Garden export need no change.
INPUT_NAME = "inputs"


class Evaluator(Protocol):
    """Metrics accumulated over evaluation batches (COCO box AP, mask AP, top-1, ...)."""

    def update(self, outputs: dict, groundtruth: dict) -> None:
        """Adds one global batch: the task's eval outputs and the parser's ground truth, as
        NumPy arrays or eager tensors."""

    def result(self) -> dict[str, float]:
        """The metrics of every batch since construction, by name."""

    def write(self, directory: str, step: int) -> None:
        """Writes per-example results beside the metrics (e.g. COCO detections JSON)."""


# ExperimentConfig fields that reach the model builder by their own route.
_OWN_ROUTE = {
    "use_sync_bn": "ExperimentConfig.sync_batch_norm",
    "image_size": "ExperimentConfig.image_size",
    "num_classes": "ExperimentConfig.num_classes",
    "model_id": "ExperimentConfig.model_id",
}


def model_settings(config) -> dict:
    """The model builder's keyword arguments of an experiment: config.model_overrides and
    the batch-norm mode of config.sync_batch_norm. Each setting has one route: an override of
    a setting that has its own ExperimentConfig field is an error, not silently beaten."""
    clash = sorted(set(config.model_overrides) & set(_OWN_ROUTE))
    if clash:
        routes = ", ".join(f"{k}: set {_OWN_ROUTE[k]}" for k in clash)
        raise ValueError(f"ExperimentConfig.model_overrides sets {clash} ({routes} instead)")
    return {**config.model_overrides, "use_sync_bn": config.sync_batch_norm}


class Task:
    """The interface; subclasses implement the methods that raise NotImplementedError.

    `config` arguments are `spinenet_tf.training.config.ExperimentConfig`s (read, never
    imported here: tasks sit below training). Every method that takes tensors runs inside
    the trainer's tf.function on each replica unless its docstring says otherwise.
    """

    # The losses train_losses returns and the trainer reports (their mean per host loop);
    # "total_loss" is always there.
    train_loss_names: tuple = ("total_loss",)
    # The line above the contact sheet of the evaluation drawings.
    sheet_legend: str = ""

    @property
    def decoders(self) -> Decoders:
        """How the input pipeline decodes records for this task's parser (default: the COCO
        detection schema, `spinenet_tf.data.decoders`)."""
        return detection_decoders()

    def synthetic_data(self, directory: str, **args) -> dict:
        """Generates (unless there already) the task's embedded synthetic dataset under
        `directory`; returns {"train": source, "val": source, "label_map": file naming the
        classes, "images": glob of the held-out images}. `args`: the generator's
        (ExperimentConfig.synthetic_data_args)."""
        raise NotImplementedError(f"{type(self).__name__} has no synthetic dataset")

    def build_model(self, config):
        """The experiment's Keras model, in the current dtype policy and strategy scope, from
        config.model_id, num_classes, image_size and `model_settings(config)`."""
        raise NotImplementedError

    def parser(self, model, config, training: bool) -> Callable:
        """parse(decoded example, seed=None) -> (image, labels) for `make_dataset`: training
        labels (and whatever targets are cheapest on the host), or evaluation ground truth."""
        raise NotImplementedError

    def train_targets(self, model, labels: dict, global_sum: Callable) -> dict:
        """Targets from a replica's training labels, outside the gradient tape.
        `global_sum(x)` sums a tensor over the replicas (for normalisers of the global batch)."""
        return labels

    def train_outputs(self, model, images, targets: dict):
        """The training forward pass, inside the gradient tape (default: model(images,
        training=True); a two-stage detector also feeds it the ground truth)."""
        return model(images, training=True)

    def train_losses(self, model, targets: dict, outputs) -> dict:
        """Losses of model(images, training=True) outputs: "total_loss" (this replica's share
        of the global-batch loss, weight decay excluded) and the parts that
        `train_loss_names` lists, all scalars. Counts that normalise a loss can be summed
        over the replicas here too, with `replica_sum`."""
        raise NotImplementedError

    def eval_outputs(self, model, images, groundtruth: dict) -> dict:
        """What the evaluator scores, from one replica's evaluation batch."""
        raise NotImplementedError

    def evaluator(self, config) -> Evaluator:
        """A fresh evaluator for one pass over the evaluation split (on the host)."""
        raise NotImplementedError

    def draw(
        self, images: np.ndarray, outputs: dict, groundtruth: dict, label_map: dict | None = None
    ) -> list:
        """(source id, PIL image) per real image of a gathered evaluation batch (host side;
        `images` is the normalised network input), outputs and ground truth drawn, classes
        named by label_map. Default: nothing drawn."""
        return []

    def serving_module(self, model, label_map: dict | None = None, jit_compile: bool = False):
        """An `ImageServing` whose endpoints export writes as SavedModel signatures."""
        raise NotImplementedError

    def apply_serving_overrides(self, model, overrides: dict) -> None:
        """Applies command-line decoding overrides (score_threshold, ...) to `model`."""
        if overrides:
            raise ValueError(
                f"{type(self).__name__} takes no serving overrides; got {sorted(overrides)}"
            )

    def draw_prediction(self, pixels, prediction: dict, label_map: dict, score_threshold: float):
        """A PIL image of one served prediction (`prediction`: one image's outputs of the
        exported signature, as NumPy) on the original `pixels`. Default: the image as is."""
        return Image.fromarray(np.asarray(pixels, np.uint8))

    def prediction_records(
        self, prediction: dict, label_map: dict, score_threshold: float, image_hw=None
    ) -> list[dict]:
        """JSON records of one served prediction (predict adds image_id and file_name);
        image_hw: the original image's (height, width)."""
        return [{k: np.asarray(v).tolist() for k, v in prediction.items()}]


def replica_sum(x):
    """x summed over the replicas of the current strategy (x itself outside any, or with one
    replica); call it in replica context, as every Task method that takes tensors is."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return x
    return context.all_reduce(tf.distribute.ReduceOp.SUM, x)


def class_name_table(label_map: dict | None):
    """A lookup table class id (int32) -> name ("" for ids it lacks), or None without names."""
    if not label_map:
        return None
    names = {int(k): str(v) for k, v in label_map.items()}
    ids = sorted(names)
    return tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(ids, tf.int32), tf.constant([names[i] for i in ids], tf.string)
        ),
        default_value="",
    )


def real_rows(groundtruth: dict) -> list[tuple[int, int]]:
    """(row, source id) of each real image of a gathered evaluation batch: make_dataset's
    batch fillers have source id -1."""
    ids = np.asarray(groundtruth["source_id"]).tolist()
    return [(row, source_id) for row, source_id in enumerate(ids) if source_id >= 0]


def unnormalize(images: np.ndarray) -> np.ndarray:
    """Network inputs (normalised by `ops.normalize_image`) back to uint8 pixels."""
    pixels = np.asarray(images, np.float32) * ops.STDDEV_RGB + ops.MEAN_RGB
    return np.clip(pixels, 0, 255).astype(np.uint8)


class ImageServing:
    """Images in, a task's outputs out: the preprocessing every image task serves with.

    Each input method takes a batch of any size. Preprocessing is the evaluation pipeline's
    (`spinenet_tf.data.ops`): the image is fitted into `image_size` keeping its aspect ratio
    (bilinear), normalised and padded bottom-right, so from the resize on every shape is
    static but the batch. Subclasses implement `serve(padded, image_info)`.
    """

    def __init__(self, image_size):
        self.image_size = tuple(int(s) for s in image_size)

    def serve(self, padded, image_info) -> dict:
        """Outputs for preprocessed images [B, h, w, 3] and their image_info [B, 4, 2]."""
        raise NotImplementedError

    def resources(self) -> list:
        """TF resources the endpoints use (lookup tables) for the export to track."""
        return []

    def endpoints(self) -> dict:
        """{input type: (function, input TensorSpec)} for every type of INPUT_TYPES."""
        return {
            "image_tensor": (
                self.from_image_tensor,
                tf.TensorSpec([None, None, None, 3], tf.uint8, name=INPUT_NAME),
            ),
            "image_bytes": (
                self.from_image_bytes,
                tf.TensorSpec([None], tf.string, name=INPUT_NAME),
            ),
            "tf_example": (self.from_tf_example, tf.TensorSpec([None], tf.string, name=INPUT_NAME)),
        }

    # -- inputs ------------------------------------------------------------------------------
    def from_image_tensor(self, images) -> dict:
        """uint8 images [B, H, W, 3] of one size."""
        images = tf.convert_to_tensor(images)
        if images.dtype != tf.uint8:
            raise TypeError(f"images must be uint8 [B, H, W, 3], got {images.dtype.name}")
        padded, info = self.preprocess(images)
        return self.serve(padded, info)

    def from_image_bytes(self, encoded) -> dict:
        """Encoded images [B] (JPEG, PNG, GIF or BMP), each of its own size."""
        return self._from_encoded(tf.convert_to_tensor(encoded, tf.string))

    def from_tf_example(self, serialized) -> dict:
        """Serialised tf.Examples [B] holding the image in `image/encoded` (the COCO schema
        of spinenet_tf.data.create_coco_tfrecord and Model Garden)."""
        parsed = tf.io.parse_example(
            tf.convert_to_tensor(serialized, tf.string),
            {"image/encoded": tf.io.FixedLenFeature((), tf.string)},
        )
        return self._from_encoded(parsed["image/encoded"])

    def _from_encoded(self, encoded) -> dict:
        h, w = self.image_size

        def one(data):
            # An undecodable string fails this request with InvalidArgument (TF's own
            # message: "Unknown image file format ..."); the server stays up.
            image = tf.io.decode_image(data, channels=3, expand_animations=False)
            image.set_shape([None, None, 3])
            padded, info = self.preprocess(image[None])
            return padded[0], info[0]

        padded, info = tf.map_fn(
            one,
            encoded,
            fn_output_signature=(
                tf.TensorSpec([h, w, 3], tf.float32),
                tf.TensorSpec([4, 2], tf.float32),
            ),
            parallel_iterations=16,
        )
        return self.serve(padded, info)

    def preprocess(self, images):
        """uint8 [B, H, W, 3] of one size -> (network input [B, h, w, 3] float32,
        image_info [B, 4, 2]): the evaluation parser's `ops.fit_image` and padding."""
        out_h, out_w = self.image_size
        resized, info = ops.fit_image(images, self.image_size)
        normalized = ops.normalize_image({"image": resized})["image"]
        padded = tf.image.pad_to_bounding_box(normalized, 0, 0, out_h, out_w)
        padded = tf.ensure_shape(padded, [None, out_h, out_w, 3])
        return padded, tf.tile(info[None], [tf.shape(images)[0], 1, 1])
