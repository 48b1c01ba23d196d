import numpy as np
import pytest
import tensorflow as tf

from spinenet_tf.ops.roi_align import crop_mask_targets, multilevel_roi_align, roi_levels
from tests.conftest import model_garden


def _bilinear(image, y, x):
    """The reference's sample of image [H, W, C] at (y, x): corners clamped to the map,
    weights from the clamped lower corner (extrapolating below 0)."""
    h, w = image.shape[:2]
    y0 = min(max(np.floor(y), 0), h - 1)
    x0 = min(max(np.floor(x), 0), w - 1)
    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
    ly, lx = y - y0, x - x0
    y0, y1, x0, x1 = int(y0), int(y1), int(x0), int(x1)
    return (
        (1 - ly) * (1 - lx) * image[y0, x0]
        + (1 - ly) * lx * image[y0, x1]
        + ly * (1 - lx) * image[y1, x0]
        + ly * lx * image[y1, x1]
    )


def _roi_align_numpy(image, box, size):
    """One box on one map, in the map's pixels: bin centres sampled once."""
    ymin, xmin, ymax, xmax = box
    out = np.zeros((size, size, image.shape[-1]))
    for i in range(size):
        for j in range(size):
            y = ymin + (i + 0.5) * (ymax - ymin) / size
            x = xmin + (j + 0.5) * (xmax - xmin) / size
            out[i, j] = _bilinear(image, y, x)
    return out


def test_levels_follow_the_canonical_formula():
    sizes = np.array([10.0, 111.0, 112.0, 223.0, 224.0, 447.0, 448.0, 2000.0])
    boxes = np.stack([np.zeros_like(sizes), np.zeros_like(sizes), sizes, sizes], -1)
    np.testing.assert_array_equal(roi_levels(boxes, 3, 7), [3, 3, 3, 3, 4, 4, 5, 7])
    # A 0-area box gets the lowest level instead of log(0).
    assert int(roi_levels(np.zeros((1, 4), np.float32), 3, 7)[0]) == 3


def test_roi_align_equals_a_numpy_reference(rng):
    features = {
        f"P{lv}": rng.normal(size=(2, 64 // 2**lv, 64 // 2**lv, 3)).astype(np.float32)
        for lv in (3, 4, 5)
    }
    # Level 3 (small), level 4 (224-447 px), level 5 (clamped from 6), and one box reaching
    # past the map so that samples are clamped to its last pixel.
    boxes = np.array(
        [
            [[4.0, 6.0, 30.0, 21.0], [0.0, 0.0, 300.0, 260.0], [0.0, 0.0, 900.0, 700.0]],
            [[40.0, 50.0, 63.0, 64.0], [10.0, 3.0, 12.5, 60.0], [1.0, 1.0, 2.0, 2.0]],
        ],
        np.float32,
    )
    out = multilevel_roi_align(features, boxes, output_size=5).numpy()
    assert out.shape == (2, 3, 5, 5, 3)
    levels = roi_levels(boxes, 3, 5).numpy()
    np.testing.assert_array_equal(levels, [[3, 4, 5], [3, 3, 3]])
    for b in range(2):
        for n in range(3):
            lv = levels[b, n]
            want = _roi_align_numpy(features[f"P{lv}"][b], boxes[b, n] / 2**lv, 5)
            np.testing.assert_allclose(out[b, n], want, rtol=1e-5, atol=1e-5)


def test_roi_align_equals_model_garden(rng):
    model_garden()
    from official.vision.ops.spatial_transform_ops import multilevel_crop_and_resize

    features = {
        lv: rng.normal(size=(2, 256 // 2**lv, 256 // 2**lv, 8)).astype(np.float32)
        for lv in range(3, 8)
    }
    corners = rng.uniform(0, 256, size=(2, 40, 2, 2))
    boxes = np.concatenate([corners.min(axis=2), corners.max(axis=2)], axis=-1)
    boxes = boxes[..., [0, 1, 2, 3]].astype(np.float32)
    for size in (7, 14):
        theirs = multilevel_crop_and_resize(
            {str(k): tf.constant(v) for k, v in features.items()}, tf.constant(boxes), size
        )
        ours = multilevel_roi_align({f"P{k}": v for k, v in features.items()}, boxes, size)
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_mask_targets_are_soft_crops_of_the_padded_mask():
    # A 4x4 mask whose box is 40 px: the left half is on.
    mask = np.zeros((1, 1, 4, 4), np.float32)
    mask[..., :2] = 1.0
    gt_box = np.array([[[0.0, 0.0, 40.0, 40.0]]], np.float32)
    # The ROI equal to the box samples the padded mask at 2.5, 3.5, 4.5, 5.5 (pixel i at
    # coordinate i, as the reference): half a pixel right of and below the mask's own.
    same = crop_mask_targets(mask, gt_box, gt_box, output_size=4).numpy()[0, 0]
    row = [1.0, 0.5, 0.0, 0.0]
    np.testing.assert_allclose(same, [row, row, row, np.multiply(row, 0.5)])
    # A ROI over the box's left half and beyond: soft values at the edge, zeros outside.
    roi = np.array([[[0.0, -20.0, 40.0, 20.0]]], np.float32)
    crop = crop_mask_targets(mask, gt_box, roi, output_size=8).numpy()[0, 0]
    assert crop.min() == 0.0 and 0.0 < crop.max() <= 1.0
    assert np.all(crop[:, 0] == 0.0)  # 20 px left of the box: the zero border
    assert np.any((crop > 0.0) & (crop < 1.0))  # not binarised


def test_mask_targets_equal_model_garden(rng):
    model_garden()
    from official.vision.ops.spatial_transform_ops import crop_mask_in_target_box

    masks = rng.uniform(size=(2, 6, 16, 16)).astype(np.float32)
    corners = rng.uniform(0, 100, size=(2, 6, 2, 2))
    gt = np.concatenate([corners.min(axis=2), corners.max(axis=2)], axis=-1).astype(np.float32)
    rois = (gt + rng.normal(0, 8, size=gt.shape)).astype(np.float32)
    theirs = crop_mask_in_target_box(masks, gt, rois, 28, sample_offset=0.5)
    ours = crop_mask_targets(masks, gt, rois, 28)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_roi_align_compiles_with_xla_and_has_gradients(dtype, rng):
    features = {
        f"P{lv}": tf.constant(rng.normal(size=(1, 64 // 2**lv, 64 // 2**lv, 4)), dtype)
        for lv in (3, 4, 5, 6)
    }
    boxes = tf.constant([[[0.0, 0.0, 30.0, 40.0], [8.0, 8.0, 64.0, 64.0]]])

    @tf.function(jit_compile=True)
    def run(features):
        with tf.GradientTape() as tape:
            tape.watch(features)
            out = multilevel_roi_align(features, boxes, 7)
            loss = tf.reduce_sum(tf.cast(out, tf.float32))
        return out, tape.gradient(loss, features)

    out, grads = run(features)
    assert out.shape == (1, 2, 7, 7, 4) and out.dtype == dtype
    assert float(tf.reduce_sum(tf.cast(grads["P3"], tf.float32))) > 0


def test_mask_targets_of_padding_boxes_are_zero_in_a_graph():
    # Grappler once turned the reference's (h + 1e-8) into inf for a 0-height padding box.
    crop = tf.function(crop_mask_targets)(
        np.ones((1, 1, 8, 8), np.float32),
        np.full((1, 1, 4), -1.0, np.float32),
        np.array([[[10.0, 20.0, 50.0, 70.0]]], np.float32),
    )
    np.testing.assert_array_equal(crop, 0.0)
