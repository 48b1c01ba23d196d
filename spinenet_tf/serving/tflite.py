"""TFLite export of a RetinaNet (SpineNet-Mobile first): float32, float16, dynamic-range and
int8 post-training quantisation, detections through TFLite's detection post-processing op or
builtin ops only.

The exported model has one signature, "serving_default", taking one static-size image
already resized and normalised (float32 [1, H, W, 3]; uint8 with int8 and uint8 I/O); the
preprocessing contract, the outputs and the label map are JSON, held in the file's metadata
(`read_contract`) and written beside it (`sidecar_path`). Quantisation-aware training is
not offered: the TF Model Optimization toolkit does not support Keras 3
(tensorflow/model-optimization#1119).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Iterable

import keras
import numpy as np
import tensorflow as tf

from spinenet_tf.data import ops
from spinenet_tf.ops.boxes import BBOX_XFORM_CLIP
from spinenet_tf.ops.postprocess import top_k_per_level

QUANTIZATIONS = ("none", "fp16", "dynamic", "int8")
POSTPROCESSING = ("custom_op", "builtin", "raw")
IO_DTYPES = ("float32", "uint8")
INPUT_NAME = "image"
DETECTION_OUTPUTS = ("detection_boxes", "detection_classes", "detection_scores", "num_detections")
CUSTOM_OP = "TFLite_Detection_PostProcess"
# The ops past the network's raw outputs, which int8 quantisation leaves in float.
POSTPROCESS_SCOPE = "postprocess"
# The name of the export's contract (the sidecar JSON) in the file's metadata.
CONTRACT_METADATA = "spinenet_tf_contract"


def sidecar_path(path: str) -> str:
    """The JSON that describes an exported .tflite file: same name, .json."""
    root, ext = os.path.splitext(path)
    return (root if ext == ".tflite" else path) + ".json"


@dataclasses.dataclass(frozen=True)
class PostProcessing:
    """What follows the network in the exported graph.

    mode: "custom_op": TFLite's TFLite_Detection_PostProcess (the op TFLite's detection
    tooling and delegates know); "builtin": NMS from builtin ops (NON_MAX_SUPPRESSION_V5
    among them); "raw": no post-processing, per-level class logits and box deltas. Both NMS
    variants keep a box scoring > score_threshold (>= for the custom op) and suppress at
    IoU > iou_threshold.

    class_agnostic (default): one NMS over each anchor's best class, the fast choice on a
    device (the op's default, use_regular_nms false). False: NMS within each class, as the
    Keras model decodes (more accurate, slower with many classes): the custom op's regular
    NMS over every (anchor, class) pair above the threshold; the builtin variant is the
    Keras model's own decoding (each level's top pre_nms_top_k (anchor, class) pairs, boxes
    clipped to the input, NMS within each class; `DetectionConfig`'s "per_level"), less
    the boxes wholly outside the input, which the Keras model keeps with zero area.
    """

    mode: str = "custom_op"
    max_detections: int = 100
    score_threshold: float = 0.05
    iou_threshold: float = 0.5
    class_agnostic: bool = True
    pre_nms_top_k: int = 1000

    def __post_init__(self):
        if self.mode not in POSTPROCESSING:
            raise ValueError(f"postprocess {self.mode!r}; expected one of {POSTPROCESSING}")
        if self.max_detections < 1:
            raise ValueError(f"max_detections must be >= 1, got {self.max_detections}")
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold {self.iou_threshold} must be in (0, 1]")
        if self.pre_nms_top_k < 1:
            raise ValueError(f"pre_nms_top_k must be >= 1, got {self.pre_nms_top_k}")


def float32_model(model):
    """`model` itself when it computes in float32; else a float32 copy with its weights
    (a model built under a mixed policy converts to float32, as TFLite wants)."""
    if all(layer.compute_dtype == "float32" for layer in model._flatten_layers()):
        return model
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        config = model.get_config()
        clone = type(model).from_config(_float32_config(config))
    finally:
        keras.config.set_dtype_policy(previous)
    clone.detection_config = model.detection_config
    clone.set_weights(model.get_weights())
    return clone


def _float32_config(config):
    """A serialised config with every layer's dtype policy made float32."""
    if isinstance(config, dict):
        out = {}
        for k, v in config.items():
            if k == "dtype" and v is not None:
                out[k] = "float32"
            else:
                out[k] = _float32_config(v)
        return out
    if isinstance(config, list):
        return [_float32_config(v) for v in config]
    return config


def _level_keys(anchor) -> list[str]:
    """The head's per-level keys, P{min_level}..P{max_level}: the anchors' order."""
    return [f"P{level}" for level in anchor.levels]


def _raw_outputs(model, images) -> dict:
    """Per-level class logits [1, N_l, K] and box deltas [1, N_l, 4], anchors in the order of
    `model.anchor_boxes`."""
    class_logits, box_deltas = model.head(model.backbone(images, training=False), training=False)
    out = {}
    for key in _level_keys(model.anchor_config):
        out[f"class_logits_{key}"] = tf.reshape(class_logits[key], [1, -1, model.num_classes])
        out[f"box_deltas_{key}"] = tf.reshape(box_deltas[key], [1, -1, 4])
    return out


def _anchor_vectors(model) -> list[tuple[np.ndarray, ...]]:
    """Per level, float32 vectors as fractions of the input height / width: yc [H_l] of each
    row, xc [W_l] of each column, h and w [A] of each anchor shape (`AnchorConfig.level_grid`)."""
    height, width = model.image_size
    vectors = []
    for level in model.anchor_config.levels:
        yc, xc, sizes = model.anchor_config.level_grid((height, width), level)
        parts = (yc / height, xc / width, sizes[:, 0] / height, sizes[:, 1] / width)
        vectors.append(tuple(v.astype(np.float32) for v in parts))
    return vectors


def center_size_anchors(model) -> np.ndarray:
    """The model's anchors [N, 4] as (yc, xc, h, w) in units of the input height / width
    (what TFLite's post-processing op takes; its boxes come out in the same units)."""
    levels = []
    for yc, xc, h, w in _anchor_vectors(model):
        grid = np.broadcast_arrays(
            yc[:, None, None], xc[None, :, None], h[None, None, :], w[None, None, :]
        )
        levels.append(np.stack(grid, -1).reshape(-1, 4))
    return np.concatenate(levels, axis=0)


def _anchor_tensor(model, deltas) -> tf.Tensor:
    """`center_size_anchors(model)` computed in the graph from its per-level vectors: a few
    KB in the file instead of a table of N x 16 bytes (0.20 MB for mobile-49XS at 256 px,
    0.44 MB at 384). The converter folds constant subgraphs into tables, so the vectors are
    broadcast by adding a float32 zero computed at run time (0 x the first of the box
    `deltas`), which keeps the grid in the graph as FILL and ADD ops. Adding 0 is exact: the
    values are center_size_anchors' to the bit."""
    zero = deltas[0, 0, 0] * 0.0
    levels = []
    for yc, xc, h, w in _anchor_vectors(model):
        zeros = tf.fill([len(yc), len(xc), len(h)], zero)
        grid = [
            tf.constant(yc)[:, None, None] + zeros,
            tf.constant(xc)[None, :, None] + zeros,
            tf.constant(h)[None, None, :] + zeros,
            tf.constant(w)[None, None, :] + zeros,
        ]
        levels.append(tf.reshape(tf.stack(grid, -1), [-1, 4]))
    return tf.concat(levels, axis=0)


def _concat_outputs(model, raw: dict):
    levels = _level_keys(model.anchor_config)
    logits = tf.concat([raw[f"class_logits_{k}"] for k in levels], axis=1)
    deltas = tf.concat([raw[f"box_deltas_{k}"] for k in levels], axis=1)
    # Our decoding caps the log-scale deltas (spinenet_tf.ops.boxes); the op does not.
    deltas = tf.concat([deltas[..., :2], tf.minimum(deltas[..., 2:], BBOX_XFORM_CLIP)], -1)
    return logits, deltas


def _custom_op_signature(post: PostProcessing, num_classes: int) -> str:
    attrs = [
        ("max_detections", "i", post.max_detections),
        ("max_classes_per_detection", "i", 1),
        ("detections_per_class", "i", post.max_detections),
        ("use_regular_nms", "b", "false" if post.class_agnostic else "true"),
        ("nms_score_threshold", "f", _logit(post.score_threshold)),
        ("nms_iou_threshold", "f", post.iou_threshold),
        ("y_scale", "f", 1.0),
        ("x_scale", "f", 1.0),
        ("h_scale", "f", 1.0),
        ("w_scale", "f", 1.0),
        # The kernel scores the last num_classes columns only: passing K - 1 leaves out
        # column 0, background (Model Garden passes K and scores background too).
        ("num_classes", "i", num_classes),
    ]
    return " ".join(
        [f'name: "{CUSTOM_OP}"']
        + [f'attr {{ key: "{k}" value {{ {t}: {v} }} }}' for k, t, v in attrs]
    )


def _logit(score_threshold: float) -> float:
    """The score threshold in logit space (sigmoid is monotonic: same selection, same order)."""
    if score_threshold <= 0.0:
        return -1e30
    return float(np.log(score_threshold / (1.0 - score_threshold)))


def _custom_op_detections(model, raw: dict, post: PostProcessing) -> dict:
    # The op thresholds and ranks the logits themselves, and only the kept scores go through
    # the sigmoid: at 256 px a sigmoid of every anchor and class (12,276 x 91) took more
    # time than the op.
    logits, deltas = _concat_outputs(model, raw)
    anchors = _anchor_tensor(model, deltas)
    d = post.max_detections

    # A placeholder body, which the converter replaces with the op (MLIR's nms_utils keys on
    # the "implements" attribute; the outputs' shapes are the op's).
    @tf.function(
        experimental_implements=_custom_op_signature(post, model.num_classes - 1),
        autograph=False,
    )
    def detection_postprocess(box_encodings, class_predictions, anchors):
        del box_encodings, class_predictions, anchors
        return (
            tf.zeros([1, d, 4], name="boxes"),
            tf.zeros([1, d], name="classes"),
            tf.zeros([1, d], name="scores"),
            tf.zeros([1], name="num_detections"),
        )

    boxes, classes, scores, num = detection_postprocess(deltas, logits, anchors)
    return _detections(boxes, tf.cast(classes, tf.int32) + 1, tf.sigmoid(scores), num, post)


def _builtin_detections(model, raw: dict, post: PostProcessing) -> dict:
    logits, deltas = _concat_outputs(model, raw)
    anchors = _anchor_tensor(model, deltas)
    # In logit space, as the custom op (see there).
    if post.class_agnostic:
        scores = tf.reduce_max(logits[0, :, 1:], axis=-1)
        classes = tf.cast(tf.argmax(logits[0, :, 1:], axis=-1), tf.int32) + 1
        boxes = _decode_clipped(deltas[0], anchors)
    else:
        # The Keras model's own pre-NMS selection (TOPK_V2 in the file).
        scores, anchor_idx, classes = (
            t[0] for t in top_k_per_level(logits[:, :, 1:], model.level_sizes, post.pre_nms_top_k)
        )
        boxes = _decode_clipped(tf.gather(deltas[0], anchor_idx), tf.gather(anchors, anchor_idx))
    # A box wholly outside the input clips to zero area, and TFLite's NON_MAX_SUPPRESSION_V5
    # returns such a box again and again (its IoU with itself is 0): those are dropped.
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    scores = tf.where(area > 0.0, scores, np.finfo(np.float32).min)
    # NMS within each class as one NMS: each class's boxes moved to a square of their own
    # ([c, c + 1] on both axes, c the class id), so boxes of two classes never overlap.
    # IoU is unchanged up to float32 rounding at the offset (below 1e-5 of a box side).
    offset = 0.0 if post.class_agnostic else tf.cast(classes, tf.float32)[:, None]
    # The raw op: TF's tf.image wrappers add ops TFLite lacks; this one maps to the builtin
    # NON_MAX_SUPPRESSION_V5 (padded output, count of valid rows).
    selected, _, num = tf.raw_ops.NonMaxSuppressionV5(
        boxes=boxes + offset,
        scores=scores,
        max_output_size=post.max_detections,
        iou_threshold=post.iou_threshold,
        score_threshold=_logit(post.score_threshold),
        soft_nms_sigma=0.0,
        pad_to_max_output_size=True,
    )
    return _detections(
        tf.gather(boxes, selected)[None],
        tf.gather(classes, selected)[None],
        tf.sigmoid(tf.gather(scores, selected))[None],
        num[None],
        post,
    )


def _decode_clipped(deltas, anchors):
    """Boxes (ymin, xmin, ymax, xmax) as fractions of the input, clipped to it, from deltas
    [M, 4] (log-scales already capped) and center-size anchors [M, 4]. Clipped before NMS,
    as `RetinaNet.detect` does."""
    dy, dx, dh, dw = tf.unstack(deltas, axis=-1)
    yc = dy * anchors[:, 2] + anchors[:, 0]
    xc = dx * anchors[:, 3] + anchors[:, 1]
    half_h = 0.5 * tf.exp(dh) * anchors[:, 2]
    half_w = 0.5 * tf.exp(dw) * anchors[:, 3]
    boxes = tf.stack([yc - half_h, xc - half_w, yc + half_h, xc + half_w], axis=-1)
    return tf.clip_by_value(boxes, 0.0, 1.0)


def _detections(boxes, classes, scores, num, post: PostProcessing) -> dict:
    """The outputs: rows past num_detections zero (the op leaves them unset), boxes inside
    the input. Classes and counts go through int32 so that int8 quantisation leaves them
    alone."""
    num = tf.cast(num, tf.int32)
    valid = tf.range(post.max_detections)[None] < num[:, None]
    return {
        "detection_boxes": tf.where(valid[..., None], tf.clip_by_value(boxes, 0.0, 1.0), 0.0),
        "detection_classes": tf.where(valid, tf.cast(classes, tf.int32), 0),
        "detection_scores": tf.where(valid, scores, 0.0),
        "num_detections": num,
    }


def serving_function(model, post: PostProcessing):
    """The tf.function the export converts: image [1, H, W, 3] float32 -> outputs."""
    height, width = model.image_size

    def serve(image):
        raw = _raw_outputs(model, image)
        if post.mode == "raw":
            return raw
        with tf.name_scope(POSTPROCESS_SCOPE):
            if post.mode == "custom_op":
                return _custom_op_detections(model, raw, post)
            return _builtin_detections(model, raw, post)

    spec = tf.TensorSpec([1, height, width, 3], tf.float32, name=INPUT_NAME)
    return tf.function(serve, input_signature=[spec], autograph=False)


def _calibration(representative_dataset, image_size) -> Callable:
    """The converter's representative dataset: a generator of [image [1, H, W, 3]] from an
    iterable (or a callable returning one) of normalised images [H, W, 3] or [1, H, W, 3]."""
    expected = (1, *image_size, 3)

    def generate():
        source = representative_dataset() if callable(representative_dataset) else None
        source = representative_dataset if source is None else source
        count = 0
        for item in source:
            if isinstance(item, (tuple, list)):
                item = item[0]
            array = np.asarray(item)
            if array.ndim == 3:
                array = array[None]
            if array.shape != expected:
                raise ValueError(
                    f"representative_dataset image {count} has shape {array.shape}; the "
                    f"model takes {expected} (the experiment's image size, batch 1)"
                )
            if not np.issubdtype(array.dtype, np.floating):
                raise ValueError(
                    f"representative_dataset image {count} is {array.dtype}; expected float "
                    "images normalised as the model's input (see the sidecar JSON)"
                )
            count += 1
            yield {INPUT_NAME: array.astype(np.float32)}
        if count == 0:
            raise ValueError("representative_dataset yielded no images")

    return generate


def convert(
    model,
    quantization: str = "none",
    postprocess: PostProcessing | str = "custom_op",
    representative_dataset: Iterable | Callable | None = None,
    io_dtype: str = "float32",
    allow_flex: bool = False,
) -> bytes:
    """The .tflite flatbuffer of `model` (a RetinaNet); see `export_tflite`."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r}; expected one of {QUANTIZATIONS}")
    if io_dtype not in IO_DTYPES:
        raise ValueError(f"io_dtype {io_dtype!r}; expected one of {IO_DTYPES}")
    if io_dtype != "float32" and quantization != "int8":
        raise ValueError(f"io_dtype {io_dtype!r} needs quantization='int8', got {quantization!r}")
    if quantization == "int8" and representative_dataset is None:
        raise ValueError("quantization='int8' needs a representative_dataset to calibrate on")
    if not isinstance(postprocess, PostProcessing):
        postprocess = postprocessing(model, postprocess)
    model = float32_model(model)
    concrete = serving_function(model, postprocess).get_concrete_function()
    # Variables tracked by a plain module: the converter saves it to read the signature
    # (input and output names) back; a Keras 3 model is no TF trackable of its variables.
    holder = tf.Module()
    holder.variables_ = [v.value for v in model.variables]
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], holder)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS] + (
        [tf.lite.OpsSet.SELECT_TF_OPS] if allow_flex else []
    )
    converter.allow_custom_ops = postprocess.mode == "custom_op"
    if quantization == "none":
        return converter.convert()
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "fp16":
        converter.target_spec.supported_types = [tf.float16]
        return converter.convert()
    if quantization == "dynamic":
        return share_vectors(converter.convert())
    converter.representative_dataset = _calibration(representative_dataset, model.image_size)
    return share_vectors(_quantize_network(converter, io_dtype, raw=postprocess.mode == "raw"))


def share_vectors(data: bytes) -> bytes:
    """The same .tflite model with each distinct flatbuffer vector written once, the tables
    that hold an equal vector pointing at that one (flatbuffers allows shared vectors; the
    model and its outputs are unchanged).

    A per-channel quantised tensor carries a scale (float32) and a zero point (int64) per
    channel, and the zero points of int8 weights and biases are all 0: the converter writes
    one such vector per tensor, 0.40 MB of mobile-49XS's 1.83 MB int8 file at 256 px.
    Files whose weights sit past the flatbuffer (buffer offsets, models over 2 GB) are
    returned as they are.
    """
    return _repack(data)


def _repack(data: bytes, edit: Callable | None = None) -> bytes:
    """`data` read into flatbuffer_utils' model object, changed in place by `edit(model)`
    if given, and written again with each distinct vector once. Files whose weights sit
    past the flatbuffer (buffer offsets, models over 2 GB) are returned as they are."""
    import flatbuffers
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(data)
    if any(buffer.offset > 1 for buffer in model.buffers):
        return data
    if edit is not None:
        edit(model)

    class SharingBuilder(flatbuffers.Builder):
        def __init__(self, size):
            super().__init__(size)
            self.written = {}

        def CreateNumpyVector(self, x):
            key = (x.dtype.str, x.tobytes())
            if key not in self.written:
                self.written[key] = super().CreateNumpyVector(x)
            return self.written[key]

    builder = SharingBuilder(len(data))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def embed_contract(data: bytes, contract: dict) -> bytes:
    """The .tflite model `data` with `contract` (the export's JSON, UTF-8) in the file: a
    buffer named CONTRACT_METADATA in the model's metadata list, where TFLite keeps its own
    named entries (min_runtime_version); runtimes ignore names they do not know. Files
    whose weights sit past the flatbuffer (over 2 GB) are returned as they are."""
    from tensorflow.lite.python import schema_py_generated as schema

    def add(model):
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(json.dumps(contract, indent=1).encode(), np.uint8)
        model.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name, entry.buffer = CONTRACT_METADATA.encode(), len(model.buffers) - 1
        others = [m for m in model.metadata or [] if m.name.decode() != CONTRACT_METADATA]
        model.metadata = [*others, entry]

    return _repack(data, add)


def read_contract(data: bytes) -> dict | None:
    """The contract `embed_contract` put in a .tflite file's bytes, or None."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.Model.GetRootAs(data, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name().decode() == CONTRACT_METADATA:
            return json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
    return None


# The narrowest calibrated range an int8 activation keeps. A dead channel (a 1-filter
# squeeze-excite conv whose ReLU output is 0 on every calibration image) calibrates to
# about 1e-6, and the requantisation scale of the conv that produces it (input scale x
# weight scale / output scale, about 1,000) makes XNNPACK (ai-edge-litert 2.3.0) abort with
# a double free; TFLite's own kernels run it.
MIN_CALIBRATED_RANGE = 1e-3


def _quantize_network(converter, io_dtype: str, raw: bool) -> bytes:
    """Full-integer quantisation of the network, the post-processing left in float32.

    The converter's own int8 pass also quantises the box decoding, the sigmoid and whatever
    follows the detection op (class ids through an int8 scale, boxes to 1/256 of the image);
    here the ops under POSTPROCESS_SCOPE and the outputs lose their calibration ranges and
    are denylisted, so they stay float. This uses TFLite's calibrate-only mode and
    `mlir_quantize`, on which the public QuantizationDebugger is built (TF 2.20).
    """
    from tensorflow.lite.python import convert as lite_convert
    from tensorflow.lite.tools import flatbuffer_utils

    converter._experimental_calibrate_only = True
    with warnings.catch_warnings():
        # The calibrator runs tf.lite.Interpreter, which warns of its deprecation.
        warnings.filterwarnings("ignore", "(?s).*tf.lite.Interpreter is deprecated")
        model = flatbuffer_utils.convert_bytearray_to_object(converter.convert())
    float_nodes = []
    for tensor in model.subgraphs[0].tensors:
        name = tensor.name.decode()
        if not raw and name.startswith((POSTPROCESS_SCOPE + "/", "StatefulPartitionedCall")):
            tensor.quantization = None
            float_nodes.append(name)
            continue
        q = tensor.quantization
        if q is None or q.min is None or q.max is None or len(q.min) != 1:
            continue
        low, high = float(q.min[0]), float(q.max[0])
        if high - low < MIN_CALIBRATED_RANGE:
            middle = (low + high) / 2
            q.min = np.array([middle - MIN_CALIBRATED_RANGE / 2], np.float32)
            q.max = np.array([middle + MIN_CALIBRATED_RANGE / 2], np.float32)
    io_type = tf.uint8 if io_dtype == "uint8" else tf.float32
    quantized = lite_convert.mlir_quantize(
        bytes(flatbuffer_utils.convert_object_to_bytearray(model)),
        input_data_type=io_type,
        output_data_type=io_type if raw else tf.float32,
        denylisted_nodes=float_nodes,
    )
    # As the converter's own int8 path ends.
    return lite_convert.deduplicate_readonly_buffers(quantized)


def postprocessing(model, mode: str, class_agnostic: bool = True) -> PostProcessing:
    """The model's own decoding thresholds for `mode`."""
    config = model.detection_config
    return PostProcessing(
        mode=mode,
        max_detections=config.max_detections,
        score_threshold=config.score_threshold,
        iou_threshold=config.iou_threshold,
        class_agnostic=class_agnostic,
        pre_nms_top_k=config.pre_nms_top_k,
    )


def export_tflite(
    model,
    path: str,
    quantization: str = "none",
    postprocess: PostProcessing | str = "custom_op",
    representative_dataset: Iterable | Callable | None = None,
    io_dtype: str = "float32",
    label_map: dict | None = None,
    allow_flex: bool = False,
) -> str:
    """Writes `model` (a RetinaNet) as a TFLite file at `path` and its contract as JSON, in
    the file (metadata CONTRACT_METADATA, `read_contract`) and at `sidecar_path(path)`;
    returns path.

    The model takes one image, float32 [1, H, W, 3] at the model's image size, resized
    keeping its aspect ratio, padded bottom-right and normalised as the evaluation pipeline
    does (`spinenet_tf.data.ops`; the JSON has mean, stddev and the steps). Outputs, by
    signature name:
    - postprocess "custom_op" or "builtin" (`PostProcessing`; thresholds from
      model.detection_config): detection_boxes [1, D, 4] float32 (ymin, xmin, ymax, xmax as
      fractions of the input height / width), detection_classes [1, D] int32 (the dataset's
      category ids), detection_scores [1, D], num_detections [1] int32; rows past
      num_detections are zero. NMS is class-agnostic over each anchor's best class unless
      postprocess is a PostProcessing with class_agnostic=False (see there).
    - "raw": class_logits_P{l} [1, N_l, K] and box_deltas_P{l} [1, N_l, 4] per level, anchors
      as `model.anchor_boxes` (the JSON has the anchor settings and box coding).

    quantization: "none" (float32), "fp16" (float16 weights), "dynamic" (int8 weights,
    float activations), "int8" (weights and activations, calibrated on
    representative_dataset: an iterable, or a callable returning one, of normalised float
    images [H, W, 3] or [1, H, W, 3]; the post-processing stays float32). io_dtype "uint8"
    (int8 only) makes the input uint8, quantised as the JSON's "input" says, and raw outputs
    uint8. The file uses TFLite builtins (and the custom op for "custom_op"), Flex
    (SELECT_TF_OPS) ops only if allow_flex. A model under a mixed dtype policy is converted
    in float32.
    """
    data = convert(model, quantization, postprocess, representative_dataset, io_dtype, allow_flex)
    if not isinstance(postprocess, PostProcessing):
        postprocess = postprocessing(model, postprocess)
    contract = describe(model, data, quantization, postprocess, label_map)
    tf.io.gfile.makedirs(os.path.dirname(path) or ".")
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(embed_contract(data, contract))
    with tf.io.gfile.GFile(sidecar_path(path), "w") as f:
        json.dump(contract, f, indent=1)
    return path


def describe(model, data: bytes, quantization, post: PostProcessing, label_map=None) -> dict:
    """The sidecar JSON of an export: what the file takes and returns."""
    interpreter = make_interpreter(model_content=data)
    runner = interpreter.get_signature_runner()
    height, width = model.image_size
    inputs = runner.get_input_details()[INPUT_NAME]
    scale, zero_point = inputs["quantization"]
    input_info = {
        "name": INPUT_NAME,
        "shape": [1, height, width, 3],
        "dtype": np.dtype(inputs["dtype"]).name,
        "color": "RGB",
        "preprocessing": [
            f"resize keeping the aspect ratio (bilinear) so that the image fits {height}x"
            f"{width}: scale = min({height} / image height, {width} / image width)",
            "normalise: (pixel - mean) / stddev per RGB channel",
            f"pad bottom and right with zeros to {height}x{width}",
        ],
        "mean": [float(v) for v in ops.MEAN_RGB],
        "stddev": [float(v) for v in ops.STDDEV_RGB],
    }
    if scale:
        input_info["quantization"] = {
            "scale": float(scale),
            "zero_point": int(zero_point),
            "formula": "uint8 = round(normalised / scale + zero_point), clipped to 0..255",
        }
    outputs = {}
    for name, detail in sorted(runner.get_output_details().items()):
        entry = {
            "shape": [int(d) for d in detail["shape"]],
            "dtype": np.dtype(detail["dtype"]).name,
        }
        out_scale, out_zero = detail["quantization"]
        if out_scale:
            entry["quantization"] = {"scale": float(out_scale), "zero_point": int(out_zero)}
        entry["meaning"] = _output_meaning(name)
        outputs[name] = entry
    contract = {
        "format": "spinenet_tf TFLite export",
        "model": model.name,
        "num_classes": int(model.num_classes),
        "quantization": quantization,
        "postprocess": dataclasses.asdict(post),
        "input": input_info,
        "outputs": outputs,
        "label_map": {str(k): str(v) for k, v in sorted((label_map or {}).items())},
        "anchors": {
            **model.anchor_config.to_config(),
            "image_size": [height, width],
            "order": "levels min..max; per level rows, columns, then scales x aspect ratios",
            "box_coding": "yc = dy * ha + yca, xc = dx * wa + xca, h = exp(min(dh, "
            f"{BBOX_XFORM_CLIP:.6f})) * ha, w = exp(min(dw, ...)) * wa (no variances)",
        },
    }
    return contract


def _output_meaning(name: str) -> str:
    meanings = {
        "detection_boxes": "ymin, xmin, ymax, xmax as fractions of the input height / width "
        "(multiply by the input size, divide by the resize scale for original pixels); rows "
        "past num_detections are zero",
        "detection_classes": "category id of each detection (the label map's keys)",
        "detection_scores": "sigmoid score of the detection's class, sorted descending",
        "num_detections": "number of valid rows",
    }
    if name in meanings:
        return meanings[name]
    if name.startswith("class_logits_"):
        return f"class logits of level {name[13:]}'s anchors (column 0: background)"
    return f"box deltas (dy, dx, dh, dw) of level {name[11:]}'s anchors"


def make_interpreter(model_path: str | None = None, model_content: bytes | None = None, **kw):
    """A TFLite interpreter: ai-edge-litert's (the `tflite` extra), else TensorFlow's
    deprecated tf.lite.Interpreter (which TF 2.20 plans to remove)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover - the dev environment has it
        Interpreter = tf.lite.Interpreter
    return Interpreter(model_path=model_path, model_content=model_content, **kw)


class TFLiteDetector:
    """Runs an exported detector (a .tflite file and its contract: the one in the file, else
    the JSON beside it) on images of any size.

    `detect(pixels)` applies the preprocessing the JSON states and returns what the
    SavedModel's `Detector` serves for one image: num_detections [1], detection_boxes
    [1, D, 4] in that image's pixels, detection_scores [1, D], detection_classes [1, D]
    (raw exports are decoded here with the model's anchors, class-aware NMS).
    """

    def __init__(self, path: str, num_threads: int | None = None):
        json_path = sidecar_path(path)
        if not tf.io.gfile.exists(path):
            raise ValueError(f"no TFLite file {path}")
        with tf.io.gfile.GFile(path, "rb") as f:
            data = f.read()
        # The contract in the file; else (files exported before it was embedded, or edited
        # by other tools) the JSON beside it.
        self.contract = read_contract(data)
        if self.contract is None:
            if not tf.io.gfile.exists(json_path):
                raise ValueError(
                    f"{path} holds no {CONTRACT_METADATA} metadata and has no {json_path} "
                    "beside it, which state its input and outputs: export it with "
                    "python -m spinenet_tf.export --format=tflite"
                )
            with tf.io.gfile.GFile(json_path) as f:
                self.contract = json.load(f)
        else:
            json_path = f"its {CONTRACT_METADATA} metadata"
        self.path = path
        self.interpreter = make_interpreter(model_content=data, num_threads=num_threads)
        self.runner = self.interpreter.get_signature_runner()
        self.input = self.runner.get_input_details()[INPUT_NAME]
        expected = self.contract["input"]
        actual = ([int(d) for d in self.input["shape"]], np.dtype(self.input["dtype"]).name)
        if actual != (expected["shape"], expected["dtype"]):
            raise ValueError(
                f"{path} takes {actual[1]} {actual[0]} but {json_path} says "
                f"{expected['dtype']} {expected['shape']}: the JSON belongs to another export"
            )
        self.image_size = tuple(expected["shape"][1:3])
        self.label_map = {int(k): v for k, v in self.contract["label_map"].items()}
        self.mode = self.contract["postprocess"]["mode"]

    def __call__(self, image: np.ndarray) -> dict:
        """The file's own outputs for one network input (see the JSON)."""
        image = np.asarray(image)
        shape = tuple(int(d) for d in self.input["shape"])
        dtype = np.dtype(self.input["dtype"])
        if image.shape != shape or image.dtype != dtype:
            raise ValueError(
                f"{self.path} takes {dtype.name} {list(shape)} (normalised as its JSON "
                f"states); got {image.dtype.name} {list(image.shape)}"
            )
        return self.runner(**{INPUT_NAME: image})

    def detect(self, pixels) -> dict:
        """Detections for one uint8 image [h, w, 3] of any size."""
        from spinenet_tf.ops.geometry import boxes_to_original
        from spinenet_tf.tasks.base import ImageServing

        pixels = tf.convert_to_tensor(pixels)
        if pixels.dtype != tf.uint8 or pixels.shape.rank != 3 or pixels.shape[-1] != 3:
            raise ValueError(
                f"pixels must be uint8 [h, w, 3], got {pixels.dtype.name} {pixels.shape.as_list()}"
            )
        padded, info = ImageServing(self.image_size).preprocess(pixels[None])
        image = padded.numpy()
        quant = self.contract["input"].get("quantization")
        if quant:
            image = np.clip(np.round(image / quant["scale"] + quant["zero_point"]), 0, 255)
            image = image.astype(np.uint8)
        out = self(image)
        if self.mode == "raw":
            out = self._decode(out)
        height, width = self.image_size
        boxes = out["detection_boxes"] * np.array([height, width, height, width], np.float32)
        boxes = boxes_to_original(boxes, info[0], clip=True).numpy()
        valid = np.arange(boxes.shape[1])[None] < out["num_detections"][:, None]
        return {
            "num_detections": out["num_detections"].astype(np.int32),
            "detection_boxes": boxes * valid[..., None],
            "detection_scores": out["detection_scores"],
            "detection_classes": out["detection_classes"].astype(np.int32),
        }

    def _decode(self, raw: dict) -> dict:
        """Detections from a raw export's outputs (dequantised if uint8), as the Keras model
        decodes them, boxes as fractions of the input."""
        from spinenet_tf.ops.anchors import AnchorConfig
        from spinenet_tf.ops.postprocess import DetectionConfig, generate_detections

        def value(name):
            x = raw[name]
            quant = self.contract["outputs"][name].get("quantization")
            if quant:
                x = (x.astype(np.float32) - quant["zero_point"]) * quant["scale"]
            return x

        fields = {f.name for f in dataclasses.fields(AnchorConfig)}
        anchor = AnchorConfig(**{k: v for k, v in self.contract["anchors"].items() if k in fields})
        levels = _level_keys(anchor)
        post = self.contract["postprocess"]
        det = generate_detections(
            np.concatenate([value(f"class_logits_{k}") for k in levels], axis=1),
            np.concatenate([value(f"box_deltas_{k}") for k in levels], axis=1),
            anchor.boxes(self.image_size),
            anchor.level_sizes(self.image_size),
            self.image_size,
            DetectionConfig(
                max_detections=post["max_detections"],
                score_threshold=post["score_threshold"],
                iou_threshold=post["iou_threshold"],
            ),
        )
        height, width = self.image_size
        scale = np.array([height, width, height, width], np.float32)
        return {
            "detection_boxes": det["boxes"].numpy() / scale,
            "detection_scores": det["scores"].numpy(),
            "detection_classes": det["classes"].numpy(),
            "num_detections": det["num_detections"].numpy(),
        }
