import numpy as np
import pytest
import tensorflow as tf

from spinenet_tf.ops.anchors import AnchorConfig
from spinenet_tf.ops.proposals import ROI_BOX_WEIGHTS, generate_proposals
from spinenet_tf.ops.rcnn_losses import RCNNLossConfig, maskrcnn_losses
from spinenet_tf.ops.rcnn_targets import (
    ROISamplerConfig,
    RPNTargetConfig,
    balanced_sample,
    mask_targets,
    rpn_targets,
    sample_rois,
)
from tests.conftest import model_garden

SEED = tf.constant([3, 4], tf.int64)
ANCHORS = AnchorConfig(num_scales=1)


def _ground_truth():
    """Two images: two boxes and padding, and no boxes at all."""
    boxes = np.full((2, 5, 4), -1.0, np.float32)
    classes = np.full((2, 5), -1, np.int32)
    boxes[0, :2] = [[10, 10, 60, 50], [40, 70, 120, 126]]
    classes[0, :2] = [2, 5]
    return boxes, classes


def _proposals(rng, gt, num=1000):
    """Jittered copies of the ground truth (many foreground) and random boxes."""
    centre = gt[rng.integers(0, len(gt), num)] + rng.normal(0, 6, (num, 4))
    corners = rng.uniform(0, 128, (num, 2, 2))
    rand = np.concatenate([corners.min(1), corners.max(1)], -1)
    boxes = np.where(rng.uniform(size=(num, 1)) < 0.5, centre, rand)
    return np.clip(boxes, 0, 128).astype(np.float32)


@pytest.mark.parametrize("num_pos", [0, 20, 300])
def test_balanced_sample_is_exact_and_positives_first(num_pos, rng):
    labels = rng.permutation(np.r_[np.ones(num_pos), np.zeros(1100 - num_pos)]).astype(bool)
    positive = tf.constant(labels[None])
    sample = tf.function(balanced_sample, jit_compile=True)
    indices, kind = sample(positive, ~positive, 512, 0.25, SEED)
    indices, kind = indices.numpy()[0], kind.numpy()[0]
    assert indices.shape == (512,) and len(set(indices)) == 512
    expected_pos = min(num_pos, 128)
    np.testing.assert_array_equal(kind[:expected_pos], 1)
    np.testing.assert_array_equal(kind[expected_pos:], 0)
    np.testing.assert_array_equal(labels[indices], kind == 1)
    again = sample(positive, ~positive, 512, 0.25, SEED)[0].numpy()[0]
    np.testing.assert_array_equal(again, indices)  # seeded: the same draw
    other = sample(positive, ~positive, 512, 0.25, SEED + 1)[0].numpy()[0]
    assert set(other) != set(indices)


def test_sampler_returns_512_rois_a_quarter_foreground(rng):
    gt_boxes, gt_classes = _ground_truth()
    proposals = np.stack([_proposals(rng, gt_boxes[0, :2])] * 2)
    proposals[:, -50:] = 0.0  # padding rows of the proposal generator
    samples = tf.function(sample_rois, jit_compile=True)(proposals, gt_boxes, gt_classes, SEED)
    assert {k: tuple(v.shape) for k, v in samples.items()} == {
        "rois": (2, 512, 4),
        "classes": (2, 512),
        "gt_indices": (2, 512),
        "box_targets": (2, 512, 4),
    }
    classes = samples["classes"].numpy()
    # Image 0: 128 foreground first, of the boxes' classes; image 1 (no boxes): background.
    assert np.sum(classes[0] > 0) == 128 and np.all(classes[0, :128] > 0)
    assert set(classes[0, :128]) <= {2, 5} and np.all(classes[1] == 0)
    rois, gt_idx = samples["rois"].numpy(), samples["gt_indices"].numpy()
    assert np.all((rois[0, :, 2] - rois[0, :, 0]) > 0)  # padding rows not sampled
    np.testing.assert_array_equal(gt_idx[0] >= 0, classes[0] > 0)
    targets = samples["box_targets"].numpy()
    assert np.all(targets[classes == 0] == 0.0)
    matched = gt_boxes[0][gt_idx[0, :128]]
    hw = rois[0, :128, 2:] - rois[0, :128, :2]
    dy = (matched[:, 0] + matched[:, 2] - rois[0, :128, 0] - rois[0, :128, 2]) / 2 / hw[:, 0]
    np.testing.assert_allclose(targets[0, :128, 0], ROI_BOX_WEIGHTS[0] * dy, rtol=1e-4, atol=1e-4)


def test_sampler_equals_model_garden_in_distribution(rng):
    """Same labelling as Model Garden's ROISampler (its draw is its own): the same number of
    foreground ROIs, and each sampled ROI has the class and box targets Model Garden gives
    the same ROI."""
    model_garden()
    from official.vision.modeling.layers.roi_sampler import ROISampler
    from official.vision.ops import box_ops

    gt_boxes, gt_classes = _ground_truth()
    proposals = np.stack([_proposals(rng, gt_boxes[0, :2]) for _ in range(2)])
    ours = sample_rois(proposals, gt_boxes, gt_classes, SEED)
    rois, boxes, classes, _ = ROISampler()(
        tf.constant(proposals), tf.constant(gt_boxes), tf.constant(gt_classes)
    )
    np.testing.assert_array_equal(np.sum(ours["classes"] > 0, 1), np.sum(classes.numpy() > 0, 1))
    theirs = box_ops.encode_boxes(boxes, rois, weights=ROI_BOX_WEIGHTS).numpy()
    for b in range(2):
        for roi, cls, target in zip(rois[b].numpy(), classes[b].numpy(), theirs[b], strict=True):
            hit = np.where(np.all(ours["rois"][b].numpy() == roi, -1))[0]
            if len(hit):
                assert ours["classes"][b, hit[0]] == cls
                if cls > 0:
                    np.testing.assert_allclose(ours["box_targets"][b, hit[0]], target, atol=1e-4)


def test_rpn_targets_sample_256_half_foreground_and_force_each_best_anchor():
    anchors = ANCHORS.boxes((128, 128))
    gt_boxes, gt_classes = _ground_truth()
    targets = rpn_targets(anchors, gt_boxes, gt_classes, SEED)
    labels = targets["rpn_score_targets"].numpy()
    assert labels.shape == (2, len(anchors)) and targets["rpn_box_targets"].shape[-1] == 4
    assert np.all(np.sum(labels >= 0, 1) == 256)
    assert 0 < np.sum(labels[0] == 1) <= 128 and np.sum(labels[1] == 1) == 0
    np.testing.assert_array_equal(targets["rpn_box_weights"], labels == 1)
    # Unbatched (the input pipeline's case) draws the same labels for the same seed.
    single = rpn_targets(anchors, gt_boxes[0], gt_classes[0], SEED)
    assert single["rpn_score_targets"].shape == (len(anchors),)
    config = RPNTargetConfig(num_samples=64, positive_fraction=0.25)
    small = rpn_targets(anchors, gt_boxes, gt_classes, SEED, config)["rpn_score_targets"]
    assert np.sum(small.numpy()[0] == 1) <= 16 and np.sum(small.numpy()[0] >= 0) == 64


def _level_dict(flat, level_sizes, hw, per_anchor):
    out, start = {}, 0
    for level, size in zip(range(3, 8), level_sizes, strict=True):
        h, w = -(-hw // 2**level), -(-hw // 2**level)
        out[str(level)] = tf.reshape(flat[:, start : start + size], [-1, h, w, 3 * per_anchor])
        start += size
    return out


@pytest.mark.parametrize("pre_nms_top_k", [50, 2000])
def test_proposals_equal_model_garden(pre_nms_top_k, rng):
    model_garden()
    from official.vision.modeling.layers.roi_generator import _multilevel_propose_rois

    anchors, sizes = ANCHORS.boxes((128, 128)), ANCHORS.level_sizes((128, 128))
    scores = rng.normal(size=(2, len(anchors))).astype(np.float32)
    deltas = rng.normal(0, 0.2, size=(2, len(anchors), 4)).astype(np.float32)
    rois, roi_scores = tf.function(generate_proposals, jit_compile=True)(
        scores, deltas, anchors, sizes, (128, 128), pre_nms_top_k, 200, 0.7
    )
    anchor_dict = {
        k: tf.broadcast_to(tf.reshape(v, [1, -1, 4]), [2, tf.size(v) // 4, 4])
        for k, v in _level_dict(anchors[None], sizes, 128, 4).items()
    }
    theirs, their_scores = _multilevel_propose_rois(
        _level_dict(deltas.reshape(2, -1), [4 * s for s in sizes], 128, 4),
        _level_dict(scores, sizes, 128, 1),
        anchor_dict,
        tf.constant([[128.0, 128.0]] * 2),
        pre_nms_top_k=pre_nms_top_k,
        num_proposals=200,
    )
    np.testing.assert_allclose(rois, theirs, atol=1e-4)
    np.testing.assert_allclose(roi_scores, their_scores, atol=1e-6)


def test_losses_equal_model_garden(rng):
    model_garden()
    from official.vision.losses import maskrcnn_losses as mg

    sizes = [48, 12, 3]
    num_anchors, rois, classes = sum(sizes), 16, 5
    labels = rng.choice([-1, 0, 1], size=(2, num_anchors), p=[0.5, 0.4, 0.1])
    box_targets = rng.normal(size=(2, num_anchors, 4)).astype(np.float32) * (labels == 1)[..., None]
    outputs = {
        "rpn_scores": rng.normal(size=(2, num_anchors)).astype(np.float32),
        "rpn_deltas": rng.normal(size=(2, num_anchors, 4)).astype(np.float32),
        "rpn_score_targets": labels,
        "rpn_box_targets": box_targets,
        "rpn_box_weights": (labels == 1).astype(np.float32),
        "class_logits": rng.normal(size=(2, rois, classes)).astype(np.float32),
        "box_deltas": rng.normal(size=(2, rois, 4 * classes)).astype(np.float32),
        "classes": rng.integers(0, classes, size=(2, rois)),
        "box_targets": rng.normal(size=(2, rois, 4)).astype(np.float32),
        "mask_logits": rng.normal(size=(2, 4, 6, 6)).astype(np.float32),
        "mask_classes": np.array([[1, 3, 0, 0], [2, 0, 0, 0]]),
        "mask_targets": rng.uniform(size=(2, 4, 6, 6)).astype(np.float32),
    }
    ours = maskrcnn_losses(outputs, outputs, sizes, rpn_num_samples=256)
    t = {k: tf.constant(v) for k, v in outputs.items()}  # Model Garden reads static shapes

    def levels(x, per_anchor):
        """[B, N (, 4)] -> Model Garden's {level: [B, N_l, 1, per_anchor]}."""
        parts = np.split(x.reshape(2, -1), np.cumsum(sizes)[:-1] * per_anchor, axis=1)
        return {i: tf.constant(p.reshape(2, -1, 1, per_anchor)) for i, p in enumerate(parts)}

    theirs_score = mg.RpnScoreLoss(256)(
        levels(outputs["rpn_scores"], 1), levels(labels.astype(np.float32), 1)
    )
    theirs_box = mg.RpnBoxLoss(1.0 / 9)(levels(outputs["rpn_deltas"], 4), levels(box_targets, 4))
    np.testing.assert_allclose(ours["rpn_score_loss"], theirs_score, rtol=1e-5)
    np.testing.assert_allclose(ours["rpn_box_loss"], theirs_box, rtol=1e-5)
    np.testing.assert_allclose(
        ours["class_loss"],
        mg.FastrcnnClassLoss()(t["class_logits"], t["classes"]),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        ours["box_loss"],
        mg.FastrcnnBoxLoss(1.0)(t["box_deltas"], t["classes"], t["box_targets"]),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        ours["mask_loss"],
        mg.MaskrcnnLoss()(t["mask_logits"], t["mask_targets"], t["mask_classes"]),
        rtol=1e-5,
    )
    weighted = maskrcnn_losses(outputs, outputs, sizes, 256, RCNNLossConfig(mask_weight=0.0))
    np.testing.assert_allclose(
        weighted["total_loss"], ours["total_loss"] - ours["mask_loss"], rtol=1e-6
    )


def test_mask_targets_follow_the_first_samples(rng):
    gt_boxes, gt_classes = _ground_truth()
    proposals = np.stack([_proposals(rng, gt_boxes[0, :2])] * 2)
    samples = sample_rois(proposals, gt_boxes, gt_classes, SEED, ROISamplerConfig(num_masks=8))
    masks = np.ones((2, 5, 16, 16), np.float32)
    out = mask_targets(samples, gt_boxes, masks, num_masks=8, mask_size=28)
    assert out["mask_targets"].shape == (2, 8, 28, 28)
    np.testing.assert_array_equal(out["mask_classes"], samples["classes"][:, :8])
    # A full mask seen from a foreground ROI: mostly ones, soft at the box's edges.
    target = out["mask_targets"].numpy()[0]
    assert target.max() == 1.0 and np.all(target >= 0.0)


def test_per_image_seeds_draw_each_image_alike_in_any_batch(rng):
    gt_boxes, gt_classes = _ground_truth()
    gt_boxes[1], gt_classes[1] = gt_boxes[0], gt_classes[0]
    proposals = np.stack([_proposals(rng, gt_boxes[0, :2])] * 2)
    seeds = tf.constant([[3, 4], [9, 1]], tf.int64)
    sample = tf.function(sample_rois, jit_compile=True)
    both = sample(proposals, gt_boxes, gt_classes, seeds)
    for i in range(2):  # each image alone (another replica's share) draws the same
        alone = sample(
            proposals[i : i + 1], gt_boxes[i : i + 1], gt_classes[i : i + 1], seeds[i : i + 1]
        )
        for k in both:
            np.testing.assert_array_equal(alone[k][0], both[k][i], err_msg=k)
    # Same inputs, different seeds: different draws.
    assert not np.array_equal(both["rois"][0], both["rois"][1])
    rpn = rpn_targets(ANCHORS.boxes((128, 128)), gt_boxes, gt_classes, seeds)
    rpn_alone = rpn_targets(ANCHORS.boxes((128, 128)), gt_boxes[1:], gt_classes[1:], seeds[1:])
    np.testing.assert_array_equal(rpn["rpn_score_targets"][1], rpn_alone["rpn_score_targets"][0])


def test_losses_of_a_split_batch_sum_to_the_whole_with_global_counts(rng):
    sizes = [48, 12]
    n, rois = sum(sizes), 16
    labels = rng.choice([-1, 0, 1], size=(4, n), p=[0.5, 0.4, 0.1])
    outputs = {
        "rpn_scores": rng.normal(size=(4, n)),
        "rpn_deltas": rng.normal(size=(4, n, 4)),
        "rpn_score_targets": labels,
        "rpn_box_targets": rng.normal(size=(4, n, 4)) * (labels == 1)[..., None],
        "rpn_box_weights": (labels == 1).astype(np.float32),
        "class_logits": rng.normal(size=(4, rois, 3)),
        "box_deltas": rng.normal(size=(4, rois, 12)),
        "classes": rng.integers(0, 3, size=(4, rois)),
        "box_targets": rng.normal(size=(4, rois, 4)),
        "mask_logits": rng.normal(size=(4, 4, 6, 6)),
        "mask_classes": rng.integers(0, 3, size=(4, 4)),
        "mask_targets": rng.uniform(size=(4, 4, 6, 6)),
    }
    outputs = {k: tf.constant(v) for k, v in outputs.items()}
    whole = maskrcnn_losses(outputs, outputs, sizes)
    halves = [{k: v[i : i + 2] for k, v in outputs.items()} for i in (0, 2)]

    def counts_of(half):  # what each "replica" hands global_sum, in call order
        seen = []
        maskrcnn_losses(half, half, sizes, global_sum=lambda x: seen.append(x) or x)
        return seen

    def plus(other):  # global_sum on one of two replicas: its count plus the other's
        counts = iter(other)
        return lambda x: x + next(counts)

    first, second = counts_of(halves[0]), counts_of(halves[1])
    shares = [
        maskrcnn_losses(halves[0], halves[0], sizes, global_sum=plus(second)),
        maskrcnn_losses(halves[1], halves[1], sizes, global_sum=plus(first)),
    ]
    for k, v in whole.items():
        np.testing.assert_allclose(shares[0][k] + shares[1][k], v, rtol=1e-5, err_msg=k)
    # Without global counts, each half's own mean: the sum would be about twice the loss.
    alone = [maskrcnn_losses(h, h, sizes)["class_loss"] for h in halves]
    assert abs(float(alone[0] + alone[1]) / float(whole["class_loss"]) - 2.0) < 0.5
