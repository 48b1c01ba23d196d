import numpy as np
import pytest
import tensorflow as tf

from spinenet_tf.ops.boxes import pairwise_iou
from spinenet_tf.ops.postprocess import DetectionConfig, generate_detections
from tests.conftest import model_garden

# Every decoding path: (nms, pre_nms).
PATHS = [
    ("padded", "per_level"),
    ("padded", "per_class"),
    ("combined", "per_level"),
    ("combined", "per_class"),
]


def _logit(p):
    return np.log(p / (1 - p))


def _detect(logits, anchors, level_sizes, hw, valid_hw=None, **config):
    # Zero deltas decode to the anchors exactly (they lie on a 1/4-px grid).
    deltas = np.zeros(logits.shape[:2] + (4,), np.float32)
    det = generate_detections(
        logits, deltas, anchors, level_sizes, hw, DetectionConfig(**config), valid_hw=valid_hw
    )
    return {k: v.numpy() for k, v in det.items()}


def _detection_inputs():
    # Three anchors; two overlap heavily (IoU 0.82). Two foreground classes.
    anchors = np.array([[0, 0, 10, 10], [0, 1, 10, 11], [50, 50, 60, 60]], np.float32)
    logits = np.full((1, 3, 3), -10.0, np.float32)
    logits[0, 0, 1] = _logit(0.9)
    logits[0, 1, 1] = _logit(0.8)  # same class, overlapping: suppressed
    logits[0, 1, 2] = _logit(0.7)  # other class, same box: kept unless class-agnostic
    logits[0, 2, 2] = _logit(0.03)  # under the score threshold
    return logits, anchors


@pytest.mark.parametrize("nms, pre_nms", PATHS)
def test_class_aware_nms_and_score_threshold(nms, pre_nms):
    logits, anchors = _detection_inputs()
    det = _detect(logits, anchors, [3], (64, 64), max_detections=5, nms=nms, pre_nms=pre_nms)
    assert det["num_detections"][0] == 2
    np.testing.assert_allclose(det["scores"][0], [0.9, 0.7, 0, 0, 0], rtol=1e-5)
    np.testing.assert_array_equal(det["classes"][0], [1, 2, 0, 0, 0])
    np.testing.assert_array_equal(det["boxes"][0, :2], anchors[[0, 1]])
    np.testing.assert_array_equal(det["boxes"][0, 2:], 0)


@pytest.mark.parametrize("pre_nms", ["per_level", "per_class"])
def test_class_agnostic_nms_suppresses_across_classes(pre_nms):
    logits, anchors = _detection_inputs()
    det = _detect(
        logits, anchors, [3], (64, 64), max_detections=5, class_agnostic=True, pre_nms=pre_nms
    )
    assert det["num_detections"][0] == 1
    np.testing.assert_array_equal(det["classes"][0, :2], [1, 0])


@pytest.mark.parametrize("nms, pre_nms", PATHS)
def test_thresholds_are_score_above_and_iou_at_least(nms, pre_nms):
    # Class 1: a pair with IoU exactly 0.5 (inter 16, union 32): the second is suppressed.
    # Class 2: a pair with IoU 15/33 < 0.5: both kept. Class 3: score exactly 0.5 (logit 0),
    # which a threshold of 0.5 drops.
    anchors = np.array(
        [[0, 0, 4, 6], [0, 2, 4, 8], [20, 20, 24, 26], [20, 22.25, 24, 28.25], [40, 40, 50, 50]],
        np.float32,
    )
    np.testing.assert_allclose(pairwise_iou(anchors[:2], anchors[1:2])[0, 0], 0.5, rtol=0)
    logits = np.full((1, 5, 4), -10.0, np.float32)
    logits[0, [0, 1], 1] = [3.0, 2.0]
    logits[0, [2, 3], 2] = [1.5, 1.0]
    logits[0, 4, 3] = 0.0
    det = _detect(logits, anchors, [5], (64, 64), score_threshold=0.5, nms=nms, pre_nms=pre_nms)
    assert det["num_detections"][0] == 3
    np.testing.assert_array_equal(det["classes"][0, :4], [1, 2, 2, 0])
    np.testing.assert_array_equal(det["boxes"][0, :3], anchors[[0, 2, 3]])


# (input size, x of the first box, sign of IoU - 0.5): 8-px box pairs of class 90 whose IoU is
# 0.5 +- 1e-4, placed where the former class offset (class * (size + 1)) rounds them to the
# wrong side of 0.5 (checked below).
PRECISION_CASES = [
    (640, 610.0137, -1),
    (640, 610.0274, 1),
    (1280, 1250.0, -1),
    (1280, 1250.0959, 1),
]


@pytest.mark.parametrize("size, x0, sign", PRECISION_CASES)
def test_class_aware_nms_is_exact_far_from_class_zero(size, x0, sign):
    q = 0.5 + sign * 1e-4
    dx = 8 * (1 - q) / (1 + q)  # IoU of two 8x8 boxes dx apart is (8 - dx) / (8 + dx)
    y0 = size - 20.0
    anchors = np.array([[y0, x0, y0 + 8, x0 + 8], [y0, x0 + dx, y0 + 8, x0 + dx + 8]], np.float32)
    b = anchors.astype(np.float64)
    inter = (b[0, 3] - b[1, 1]) * 8
    true_iou = inter / (128 - inter)
    assert sign * (true_iou - 0.5) > 5e-5
    shift = 90 * (size + 1)
    offset_iou = float(pairwise_iou(anchors[:1] + shift, anchors[1:] + shift)[0, 0])
    assert sign * (offset_iou - 0.5) < 0  # the offset trick gets this pair wrong
    logits = np.full((1, 2, 91), -10.0, np.float32)
    logits[0, :, 90] = [2.0, 1.0]
    for pre_nms in ("per_level", "per_class"):
        det = _detect(logits, anchors, [2], (size, size), pre_nms=pre_nms)
        assert det["num_detections"][0] == (1 if sign > 0 else 2)
        np.testing.assert_array_equal(det["classes"][0, :2], [90, 0 if sign > 0 else 90])


@pytest.mark.parametrize("size", [640, 1280])
@pytest.mark.parametrize("sign", [-1, 1])
def test_class_aware_nms_decides_the_float32_neighbours_of_iou_one_half(size, sign):
    # The second box's xmin is the float32 next to where the IoU is exactly 0.5, on either
    # side: the true IoU misses 0.5 by at most ~1e-5 (640 px) or ~2e-5 (1280 px).
    x0, y0 = np.float32(size - 30.25), np.float32(size - 20)
    x1 = np.float32(x0 + np.float32(8 / 3))
    while sign * (8 - (float(x1) - float(x0))) / (8 + (float(x1) - float(x0))) <= sign * 0.5:
        x1 = np.nextafter(x1, np.float32(-sign * np.inf))
    anchors = np.array([[y0, x0, y0 + 8, x0 + 8], [y0, x1, y0 + 8, x1 + 8]], np.float32)
    b = anchors.astype(np.float64)
    inter = (b[0, 3] - b[1, 1]) * 8
    margin = sign * (inter / (128 - inter) - 0.5)
    assert 0 < margin < 2.5e-5 * size / 1280
    logits = np.full((1, 2, 91), -10.0, np.float32)
    logits[0, :, 90] = [2.0, 1.0]
    for pre_nms in ("per_level", "per_class"):
        det = _detect(logits, anchors, [2], (size, size), pre_nms=pre_nms)
        assert det["num_detections"][0] == (1 if sign > 0 else 2)


def _reference(logits, anchors, level_sizes, hw, valid_hw=None, **config):
    """Plain greedy per-class NMS in numpy on zero-delta (anchor) boxes, one image at a time:
    rows (class, ymin, xmin, ymax, xmax, score) per image, best first."""
    c = DetectionConfig(**config)
    # TF's sigmoid, so that exact score ties are the same ties.
    scores = tf.sigmoid(logits[..., 1:]).numpy()
    num_fg = scores.shape[-1]
    out = []
    for b in range(len(logits)):
        cands = []  # (anchor, class index)
        if c.pre_nms == "per_level":
            start = 0
            for size in level_sizes:
                flat = logits[b, start : start + size, 1:].ravel()
                for i in np.argsort(-flat, kind="stable")[: c.pre_nms_top_k]:
                    cands.append((start + i // num_fg, i % num_fg))
                start += size
        else:
            for k in range(num_fg):
                top = np.argsort(-logits[b, :, k + 1], kind="stable")[: c.pre_nms_top_k]
                cands += [(a, k) for a in top]
        limit = np.array(hw if valid_hw is None else np.minimum(valid_hw[b], hw), np.float32)
        boxes = np.clip(anchors, 0, np.tile(limit, 2)).astype(np.float64)
        cands.sort(key=lambda ak: (-scores[b, ak[0], ak[1]], ak[1], ak[0]))
        kept = []
        for a, k in cands:
            if scores[b, a, k] <= c.score_threshold or len(kept) == c.max_detections:
                break
            if not any(
                (c.class_agnostic or k == k2) and _iou(boxes[a], boxes[a2]) >= c.iou_threshold
                for a2, k2 in kept
            ):
                kept.append((a, k))
        out.append([[k + 1, *boxes[a], scores[b, a, k]] for a, k in kept])
    return out


def _iou(a, b):
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _rows(det):
    return [
        np.column_stack([det["classes"][b], det["boxes"][b], det["scores"][b]])[:n].tolist()
        for b, n in enumerate(det["num_detections"])
    ]


def _random_inputs(rng, ties=True, num_images=2):
    """Three levels (192 + 48 + 16 anchors) of boxes on a 1/4-px grid, crowded into a 64-px
    image so that many overlap, plus pairs with IoU exactly 0.5; 4 foreground classes whose
    logits (from a small set when `ties`) tie often."""
    level_sizes = [192, 48, 16]
    n = sum(level_sizes)
    yx = rng.integers(0, 48 * 4, (n, 2)) / 4
    hw = rng.integers(4 * 4, 24 * 4, (n, 2)) / 4
    anchors = np.concatenate([yx, yx + hw], axis=1)
    for i in range(0, n, 16):  # IoU 0.5: [y, x, y + 4s, x + 6s] and [y, x + 2s, y + 4s, x + 8s]
        y, x, s = anchors[i, 0], anchors[i, 1], rng.integers(1, 4)
        anchors[i] = [y, x, y + 4 * s, x + 6 * s]
        anchors[i + 1] = [y, x + 2 * s, y + 4 * s, x + 8 * s]
    if ties:
        logits = rng.integers(-8, 5, (num_images, n, 5)) / 2.0
    else:
        logits = rng.normal(-1.0, 2.0, (num_images, n, 5))
    return logits.astype(np.float32), anchors.astype(np.float32), level_sizes


def _assert_same(det, expected):
    assert [len(r) for r in expected] == det["num_detections"].tolist()
    for got, want in zip(_rows(det), expected, strict=True):
        np.testing.assert_array_equal(np.array(got)[:, :5], np.array(want)[:, :5])
        # Eigen's sigmoid can differ by an ulp between calls (vectorised vs tail elements).
        np.testing.assert_allclose(np.array(got)[:, 5], np.array(want)[:, 5], rtol=1e-6)
    rows = np.arange(det["scores"].shape[1])[None, :] >= det["num_detections"][:, None]
    assert not det["boxes"][rows].any() and not det["scores"][rows].any()
    assert not det["classes"][rows].any()


@pytest.mark.parametrize(
    "config",
    [
        dict(pre_nms="per_level", pre_nms_top_k=1000),
        dict(pre_nms="per_class", pre_nms_top_k=1000),
        dict(pre_nms="per_level", pre_nms_top_k=1000, class_agnostic=True),
        dict(pre_nms="per_class", pre_nms_top_k=1000, class_agnostic=True),
        dict(pre_nms="per_level", pre_nms_top_k=1000, max_detections=7),
        dict(pre_nms="per_class", pre_nms_top_k=1000, max_detections=7),
        dict(pre_nms="per_class", pre_nms_top_k=100),  # ties at the k-th place too
        dict(pre_nms="per_level", pre_nms_top_k=1000, iou_threshold=0.3, score_threshold=0.3),
    ],
)
def test_padded_nms_equals_numpy_greedy_nms_with_ties(config, rng):
    logits, anchors, level_sizes = _random_inputs(rng)
    det = _detect(logits, anchors, level_sizes, (64, 64), **config)
    # Enough detections to compare.
    assert det["num_detections"].min() >= min(20, DetectionConfig(**config).max_detections)
    _assert_same(det, _reference(logits, anchors, level_sizes, (64, 64), **config))


@pytest.mark.parametrize("pre_nms", ["per_level", "per_class"])
def test_combined_nms_equals_numpy_greedy_nms(pre_nms, rng):
    # The CPU kernel breaks exact score ties its own way, so distinct scores here.
    logits, anchors, level_sizes = _random_inputs(rng, ties=False)
    config = dict(pre_nms=pre_nms, pre_nms_top_k=1000, nms="combined")
    det = _detect(logits, anchors, level_sizes, (64, 64), **config)
    _assert_same(det, _reference(logits, anchors, level_sizes, (64, 64), **config))


@pytest.mark.parametrize("pre_nms, k", [("per_level", 30), ("per_class", 20)])
def test_pre_nms_selection_equals_numpy(pre_nms, k, rng):
    logits, anchors, level_sizes = _random_inputs(rng, ties=False)
    config = dict(pre_nms=pre_nms, pre_nms_top_k=k)
    det = _detect(logits, anchors, level_sizes, (64, 64), **config)
    _assert_same(det, _reference(logits, anchors, level_sizes, (64, 64), **config))


def test_per_level_and_per_class_selection_differ_as_documented():
    # Levels [anchors 0, 1] and [anchors 2, 3]; class 2's best anchor is on level 0, behind
    # class 1's two best. k = 1 throughout.
    anchors = np.array([[0, 0, 8, 8], [0, 20, 8, 28], [20, 0, 28, 8], [20, 20, 28, 28]], np.float32)
    logits = np.full((1, 4, 3), -10.0, np.float32)
    logits[0, 0, 1], logits[0, 1, 1] = 4.0, 3.0  # level 0, class 1
    logits[0, 1, 2], logits[0, 2, 2] = 2.0, 1.0  # class 2 on levels 0 and 1
    logits[0, 3, 1] = 0.5  # level 1, class 1
    per_level = _detect(logits, anchors, [2, 2], (64, 64), pre_nms_top_k=1)
    per_class = _detect(logits, anchors, [2, 2], (64, 64), pre_nms_top_k=1, pre_nms="per_class")
    # per_level: (anchor 0, class 1) from level 0, (anchor 2, class 2) from level 1.
    np.testing.assert_array_equal(per_level["classes"][0, :3], [1, 2, 0])
    np.testing.assert_array_equal(per_level["boxes"][0, :2], anchors[[0, 2]])
    # per_class: anchor 0 for class 1, anchor 1 for class 2 (over all levels).
    np.testing.assert_array_equal(per_class["classes"][0, :3], [1, 2, 0])
    np.testing.assert_array_equal(per_class["boxes"][0, :2], anchors[[0, 1]])


@pytest.mark.parametrize("pre_nms", ["per_level", "per_class"])
def test_boxes_are_clipped_to_each_images_valid_area_before_nms(pre_nms):
    # Boxes A [30, 0, 60, 20] and B [30, 0, 44, 20] have IoU 0.47; clipped to a 40-px-high
    # image both become [30, 0, 40, 20], so B is a duplicate of A and is suppressed. C lies in
    # the padding there: it collapses to zero area, overlaps nothing and is kept once.
    anchors = np.array([[30, 0, 60, 20], [30, 0, 44, 20], [50, 30, 60, 40]], np.float32)
    logits = np.full((3, 3, 2), -10.0, np.float32)
    logits[:, :, 1] = [2.0, 1.0, 0.0]
    valid_hw = np.array([[40, 64], [64, 64], [80, 100]], np.float32)
    det = _detect(logits, anchors, [3], (64, 64), valid_hw=valid_hw, pre_nms=pre_nms)
    np.testing.assert_array_equal(det["num_detections"], [2, 3, 3])
    np.testing.assert_array_equal(det["boxes"][0, :2], [[30, 0, 40, 20], [40, 30, 40, 40]])
    np.testing.assert_array_equal(det["boxes"][1, :3], anchors)
    np.testing.assert_array_equal(det["boxes"][2], det["boxes"][1])  # never past the input
    whole = _detect(logits, anchors, [3], (64, 64), pre_nms=pre_nms)
    for k in whole:
        np.testing.assert_array_equal(whole[k][1:], det[k][1:])
    expected = _reference(logits, anchors, [3], (64, 64), valid_hw=valid_hw, pre_nms=pre_nms)
    _assert_same(det, expected)


@pytest.mark.parametrize(
    "config",
    [
        dict(),
        dict(pre_nms="per_class", pre_nms_top_k=50),
        dict(class_agnostic=True, max_detections=10),
        dict(pre_nms="per_class", class_agnostic=True, max_detections=10),
    ],
)
def test_xla_compiles_with_static_shapes_and_equals_graph_mode(config, rng):
    # 2 images, 3 levels (4x4, 2x2, 1x1 locations, 3 anchors each), 5 classes + background.
    level_sizes = [48, 12, 3]
    n = sum(level_sizes)
    yx = rng.uniform(0, 48, (n, 2))
    anchors = np.concatenate([yx, yx + rng.uniform(4, 24, (n, 2))], 1).astype(np.float32)
    logits = rng.normal(-1.0, 2.0, (2, n, 6)).astype(np.float32)
    deltas = rng.normal(0.0, 0.2, (2, n, 4)).astype(np.float32)
    valid_hw = np.array([[64, 48], [40, 64]], np.float32)
    c = DetectionConfig(**config)

    def fn(lg, dl, hw):
        return generate_detections(lg, dl, anchors, level_sizes, (64, 64), c, valid_hw=hw)

    graph = tf.function(fn)(logits, deltas, valid_hw)
    xla = tf.function(fn, jit_compile=True)(logits, deltas, valid_hw)
    d = c.max_detections
    assert xla["boxes"].shape == (2, d, 4) and xla["scores"].shape == (2, d)
    assert xla["classes"].dtype == tf.int32 and xla["num_detections"].dtype == tf.int32
    assert int(xla["num_detections"][0]) > 5
    np.testing.assert_array_equal(xla["num_detections"], graph["num_detections"])
    np.testing.assert_array_equal(xla["classes"], graph["classes"])
    np.testing.assert_allclose(xla["scores"], graph["scores"], rtol=1e-6)
    np.testing.assert_allclose(xla["boxes"], graph["boxes"], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(nms="combined", class_agnostic=True), "class_agnostic decoding needs nms='padded'"),
        (dict(nms="fast"), "nms 'fast' must be 'padded' or 'combined'"),
        (dict(pre_nms="global"), "pre_nms 'global' must be 'per_level' or 'per_class'"),
        (dict(iou_threshold=0.0), r"iou_threshold 0.0 must be in \(0, 1\]"),
        (dict(max_detections=0), "max_detections and pre_nms_top_k must be >= 1"),
    ],
)
def test_config_errors_name_the_bad_value(config, message):
    with pytest.raises(ValueError, match=message):
        DetectionConfig(**config)


@pytest.mark.parametrize("k", [100, 1000])
def test_per_class_selection_equals_model_garden_v2(k, rng):
    model_garden()
    from official.vision.modeling.layers.detection_generator import _generate_detections_v2

    logits, anchors, level_sizes = _random_inputs(rng)  # exact ties and IoU-0.5 pairs
    boxes = np.clip(anchors, 0, 64)
    theirs = _generate_detections_v2(
        tf.constant(np.broadcast_to(boxes[None, :, None], (2,) + boxes.shape[:1] + (1, 4))),
        tf.sigmoid(logits[..., 1:]),
        pre_nms_top_k=k,
        pre_nms_score_threshold=0.05,
        nms_iou_threshold=0.5,
        max_num_detections=50,
    )
    ours = _detect(
        logits,
        anchors,
        level_sizes,
        (64, 64),
        pre_nms="per_class",
        pre_nms_top_k=k,
        max_detections=50,
    )
    np.testing.assert_array_equal(ours["num_detections"], theirs[3])
    np.testing.assert_array_equal(ours["boxes"], theirs[0])
    np.testing.assert_allclose(ours["scores"], theirs[1], rtol=1e-6)
    valid = np.arange(50)[None, :] < ours["num_detections"][:, None]
    np.testing.assert_array_equal(ours["classes"], np.where(valid, theirs[2] + 1, 0))
