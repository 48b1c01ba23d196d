"""Data ops eagerly and inside tf.data, parsers, and make_dataset."""

import numpy as np
import pytest
import tensorflow as tf

from spinenet_tf.data import ops
from spinenet_tf.data.dataset import TFDSSource, make_dataset
from spinenet_tf.data.parsers import detection_parser


def _example(h=40, w=60):
    image = np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3)
    masks = np.zeros((2, h, w), np.uint8)
    masks[0, 4:20, 6:30] = 1
    masks[1, 20:40, 30:60] = 1
    return {
        "image": tf.constant(image),
        "source_id": tf.constant(7, tf.int64),
        "height": tf.constant(h),
        "width": tf.constant(w),
        "boxes": tf.constant([[4 / h, 6 / w, 20 / h, 30 / w], [0.5, 0.5, 1.0, 1.0]], tf.float32),
        "classes": tf.constant([3, 5], tf.int32),
        "is_crowd": tf.constant([False, True]),
        "areas": tf.constant([384.0, 600.0]),
        "masks": tf.constant(masks),
    }


def _both_ways(fn, d):
    """fn(d) eagerly and inside a tf.data map; checks they agree and returns the eager one."""
    eager = fn(d)
    in_data = next(iter(tf.data.Dataset.from_tensors(d).map(fn)))
    for k in eager:
        np.testing.assert_allclose(np.asarray(eager[k]), np.asarray(in_data[k]), err_msg=k)
    return eager


def test_flip_mirrors_image_boxes_and_masks():
    d = _example()
    out = _both_ways(lambda x: ops.random_horizontal_flip(x, [1, 2], probability=1.0), d)
    np.testing.assert_array_equal(out["image"], d["image"].numpy()[:, ::-1])
    np.testing.assert_allclose(out["boxes"][0], [0.1, 0.5, 0.5, 0.9], atol=1e-6)
    np.testing.assert_array_equal(out["masks"], d["masks"].numpy()[:, :, ::-1])
    same = ops.random_horizontal_flip(d, [1, 2], probability=0.0)
    np.testing.assert_array_equal(same["image"], d["image"])


def test_resize_without_jitter_maps_boxes_to_pixels():
    out = _both_ways(lambda x: ops.resize_and_crop(x, (64, 64)), _example())
    assert out["image"].shape == (43, 64, 3)  # the long side fits 64; 40 * 64/60 = 42.7
    np.testing.assert_allclose(out["image_info"], [[40, 60], [64, 64], [43 / 40, 64 / 60], [0, 0]])
    np.testing.assert_allclose(out["boxes"][0], [4 * 43 / 40, 6 * 64 / 60, 20 * 43 / 40, 32.0])


def test_scale_jitter_crops_into_the_window_and_drops_emptied_boxes():
    d = _example()
    for seed in range(8):
        out = _both_ways(lambda x, s=seed: ops.resize_and_crop(x, (32, 32), (1.5, 2.0), [s, 0]), d)
        assert out["image"].shape == (32, 32, 3)
        boxes = out["boxes"].numpy()
        assert (boxes >= 0).all() and (boxes <= 32).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) > 0.0).all()
        assert out["classes"].shape[0] == boxes.shape[0] == out["masks"].shape[0]
        scale = out["image_info"][2].numpy()
        assert scale[1] >= 32 / 60 * 1.5 - 0.02


def test_boxes_of_any_positive_area_are_kept_and_empty_ones_dropped():
    """As Model Garden: a sub-pixel box trains; a zero-width one does not (in evaluation,
    every box stays, for COCO)."""
    d = dict(_example(), boxes=tf.constant([[0.1, 0.1, 0.11, 0.108], [0.5, 0.5, 0.9, 0.5]]))
    train = ops.resize_and_crop(d, (64, 64))
    np.testing.assert_array_equal(train["classes"], [3])
    height, width = (train["boxes"][0, 2:] - train["boxes"][0, :2]).numpy()
    assert 0 < height < 1 and 0 < width < 1
    evaluation = ops.fit(d, (64, 64))
    np.testing.assert_array_equal(evaluation["classes"], [3, 5])


@pytest.mark.parametrize("hw", [(40, 60), (61, 37), (64, 64), (13, 200)])
def test_fit_is_resize_and_crop_without_jitter(hw):
    """Evaluation and serving resize with `fit`; it is exactly the training resize without
    jitter (same pixels, image_info and boxes)."""
    d = _example(*hw)
    fitted = _both_ways(lambda x: ops.fit(x, (48, 56)), d)
    cropped = ops.resize_and_crop(d, (48, 56))
    for key in ("image", "image_info", "boxes"):
        np.testing.assert_allclose(fitted[key], cropped[key], rtol=1e-6, atol=1e-4, err_msg=key)


def test_normalize_pad_and_pad_instances():
    d = ops.resize_and_crop(_example(), (64, 64))
    d = ops.normalize_image(d)
    np.testing.assert_allclose(d["image"][0, 0, 0], (0 - ops.MEAN_RGB[0]) / ops.STDDEV_RGB[0])
    d = _both_ways(lambda x: ops.pad_instances(ops.pad_image(x, (64, 64)), 5), d)
    assert d["image"].shape == (64, 64, 3)
    assert float(tf.reduce_max(tf.abs(d["image"][43:]))) == 0.0
    np.testing.assert_array_equal(d["classes"], [3, 5, -1, -1, -1])
    assert d["boxes"].shape == (5, 4) and d["masks"].shape == (5, 40, 60)
    truncated = ops.pad_instances(_example(), 1)
    assert truncated["classes"].shape == (1,) and int(truncated["num_instances"]) == 2


def test_groundtruth_returns_original_pixels():
    d = ops.pad_instances(ops.resize_and_crop(_example(), (64, 64)), 4)
    gt = _both_ways(ops.groundtruth, d)
    np.testing.assert_allclose(gt["boxes"][:2], [[4, 6, 20, 30], [20, 30, 40, 60]], atol=1e-4)
    np.testing.assert_array_equal(gt["is_crowd"], [False, True, False, False])
    assert int(gt["source_id"]) == 7


def test_crop_masks_cuts_each_instance_at_its_box():
    out = _both_ways(lambda x: ops.crop_masks(x, 8), _example())
    soft = out["masks"].numpy()
    assert soft.shape == (2, 8, 8) and soft.dtype == np.float32
    # Each box is exactly its filled rectangle: ones inside, soft only along the edges (the
    # reference keeps the bilinear crops soft).
    np.testing.assert_array_equal(soft[:, 1:-1, 1:-1], 1.0)
    assert 0.2 < soft.min() < 1.0  # corners: half of half
    binary = _both_ways(lambda x: ops.crop_masks(x, 8, binarize=True), _example())["masks"]
    assert set(np.unique(binary)) == {0.0, 1.0}
    np.testing.assert_array_equal(binary, soft >= 0.5)


def test_crop_masks_after_a_crop_follow_the_clipped_box():
    d = _example()
    masks = d["masks"].numpy()
    masks[1, :, 45:] = 0  # the second instance (x 30-60) fills only its box's left half
    d["masks"] = tf.constant(masks)
    # Upscaled 2x and cut to a 64 x 64 window at x offset 44: the second box now spans
    # original x 30-51, so its crop is 15 / 21 = 71% mask across, not the half of its
    # whole box (the crop is taken at the final box, as the reference's parser does).
    d = ops.resize_and_crop(d, (64, 64), (2.0, 2.0), tf.constant([0, 0], tf.int64))
    np.testing.assert_allclose(d["image_info"][3], [16.85, 44.42], atol=0.01)
    crop = ops.crop_masks(d, 16)["masks"].numpy()[1]
    columns = (crop > 0.5).mean(axis=0) > 0.5
    assert columns.sum() in (10, 11), columns  # 0.71 * 16 = 11.4, the edge column soft
    assert not columns[12:].any()


def test_parser_drops_crowds_and_labels_sampling_seeds():
    parse = detection_parser(
        64, training=True, include_masks=True, mask_size=8, skip_crowd=True, rcnn_labels=True
    )
    _, labels = _both_ways_parser(parse, _example())
    assert labels["classes"].numpy()[:3].tolist() == [3, -1, -1]  # the crowd (5) dropped
    assert labels["seed"].dtype == tf.int64 and labels["seed"].shape == (2,)
    assert labels["valid_hw"].numpy().tolist() == [43, 64]  # 40 x 60 fitted into 64
    other = parse(_example(), tf.constant([5, 2], tf.int64))[1]["seed"]
    assert not np.array_equal(labels["seed"], other)  # each element its own seed


def test_parser_labels_and_dtype():
    train = detection_parser(64, training=True, scale_range=(0.5, 2.0), image_dtype="bfloat16")
    image, labels = _both_ways_parser(train, _example())
    assert image.dtype == tf.bfloat16 and image.shape == (64, 64, 3)
    assert sorted(labels) == ["boxes", "classes", "is_crowd", "num_instances"]
    assert labels["boxes"].shape == (100, 4)
    masks = detection_parser(64, training=True, include_masks=True, mask_size=16)
    assert _both_ways_parser(masks, _example())[1]["masks"].shape == (100, 16, 16)
    _, gt = detection_parser(64, training=False)(_example())
    assert sorted(gt) == [
        "areas",
        "boxes",
        "classes",
        "image_info",
        "is_crowd",
        "num_instances",
        "source_id",
    ]


def _both_ways_parser(parse, d):
    eager = parse(d, tf.constant([4, 2], tf.int64))
    ds = tf.data.Dataset.from_tensors((d, tf.constant([4, 2], tf.int64))).map(parse)
    in_data = next(iter(ds))
    np.testing.assert_allclose(np.asarray(eager[0], np.float32), np.asarray(in_data[0], np.float32))
    return eager


def test_parser_builds_retinanet_targets_on_the_host():
    from spinenet_tf import build_retinanet
    from tests.conftest import TINY

    model = build_retinanet("49S", num_classes=6, image_size=64, **TINY)
    parse = detection_parser(64, training=True, targets_fn=model.labeler.targets)
    _, labels = _both_ways_parser(parse, _example())
    n = model.anchor_boxes.shape[0]
    assert labels["cls_targets"].shape == (n,) and labels["box_targets"].shape == (n, 4)
    assert set(np.unique(labels["cls_targets"])) <= {0, 3, 5}
    assert float(tf.reduce_sum(labels["box_weights"])) >= 1
    # Compact host-side matches, encoded by the model, give the same targets.
    compact = detection_parser(64, training=True, targets_fn=model.labeler.matches)
    _, matched = _both_ways_parser(compact, _example())
    assert matched["anchor_matches"].shape == (n,) and matched["anchor_matches"].dtype == tf.int32
    encoded = model.labeler.targets({k: v[None] for k, v in matched.items()})
    for key in ("cls_targets", "box_targets", "cls_weights", "box_weights"):
        np.testing.assert_allclose(encoded[key][0], labels[key], atol=1e-6, err_msg=key)


def _batches(ds, n=None):
    out = []
    for i, (image, labels) in enumerate(ds):
        if n is not None and i == n:
            break
        out.append((image.numpy(), {k: v.numpy() for k, v in labels.items()}))
    return out


def test_make_dataset_is_deterministic_and_static(shapes_records):
    parse = detection_parser(64, training=True, scale_range=(0.5, 2.0))

    def run():
        ds = make_dataset(shapes_records["train"], parse, 4, training=True, deterministic=True)
        return _batches(ds, 3)

    a, b = run(), run()
    for (ia, la), (ib, lb) in zip(a, b, strict=False):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(la["boxes"], lb["boxes"])
    ds = make_dataset(shapes_records["train"], parse, 4, training=True)
    assert ds.element_spec[0].shape == (4, 64, 64, 3)
    assert ds.element_spec[1]["boxes"].shape == (4, 100, 4)


def test_eval_pass_covers_every_image_once_with_filler(shapes_records, shapes_dir):
    import json

    from spinenet_tf.data import shapes

    coco = json.loads(shapes.annotation_path(shapes_dir, "val").read_text())
    parse = detection_parser(64, training=False)
    batches = _batches(make_dataset(shapes_records["val"], parse, 3, training=False))
    ids = np.concatenate([b[1]["source_id"] for b in batches])
    assert len(ids) % 3 == 0
    real = ids[ids >= 0]
    assert sorted(real.tolist()) == sorted(i["id"] for i in coco["images"])


@pytest.mark.parametrize("one_file", [False, True], ids=["by_file", "by_record"])
def test_input_contexts_split_the_data(shapes_records, tmp_path, one_file):
    parse = detection_parser(64, training=False)
    source = shapes_records["val"]
    if one_file:  # fewer files than input pipelines: records are split instead
        source = str(tmp_path / "one.tfrecord")
        _write_with_bad_record(shapes_records, source, -1)
    seen = []
    for i in range(2):
        ctx = tf.distribute.InputContext(2, i, 2)
        ds = make_dataset(source, parse, 4, training=False, input_context=ctx)
        assert ds.element_spec[0].shape[0] == 2  # per-replica batch
        ids = np.concatenate([b[1]["source_id"] for b in _batches(ds)])
        seen.append(set(ids[ids >= 0].tolist()))
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 8


def test_records_augment_alike_on_any_number_of_input_pipelines(shapes_records, tmp_path):
    """Two workers sharing one file's records (as MultiWorkerMirroredStrategy's do) augment
    each record exactly as one pipeline does, over several passes: the seed of a record
    follows its key and pass, not its position in a worker's stream."""
    parse = detection_parser(64, training=True, scale_range=(0.5, 2.0))
    source = str(tmp_path / "one.tfrecord")
    count = _write_with_bad_record(shapes_records, source, -1)
    steps = 2 * count // 4 + 1  # into the third pass

    def examples(ctx):
        ds = make_dataset(
            source,
            parse,
            4,
            training=True,
            input_context=ctx,
            shuffle_buffer=0,
            deterministic=True,
            seed=3,
        )
        return [
            list(zip(image, labels["boxes"], strict=True)) for image, labels in _batches(ds, steps)
        ]

    def same(a, b):
        return np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])

    one = examples(None)
    two = [examples(tf.distribute.InputContext(2, i, 2)) for i in range(2)]
    for step in range(steps):
        merged = two[0][step] + two[1][step]
        assert len(merged) == len(one[step]) == 4
        for example in one[step]:  # each augmented record has an identical twin
            twin = next((i for i, other in enumerate(merged) if same(example, other)), None)
            assert twin is not None, f"step {step}: an example of one pipeline has no twin"
            merged.pop(twin)
    # A record is augmented anew on each pass: pass 2 repeats pass 1's records, not images.
    per_pass = count // 4
    assert not any(same(a, b) for a in one[0] for b in one[per_pass])


def _write_with_bad_record(shapes_records, path, bad_index):
    good = list(tf.data.TFRecordDataset(tf.io.gfile.glob(shapes_records["val"])))
    with tf.io.TFRecordWriter(str(path)) as w:
        for i, r in enumerate(good):
            w.write(b"garbage, not an Example" if i == bad_index else r.numpy())
    return len(good)


def test_bad_record_is_named_or_skipped_and_counted(shapes_records, tmp_path):
    path = tmp_path / "bad.tfrecord"
    total = _write_with_bad_record(shapes_records, path, 3)
    parse = detection_parser(64, training=False)
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"corrupt record 3 in shard .*bad.tfrecord"
    ):
        _batches(make_dataset(str(path), parse, 2, training=False))
    counter = tf.Variable(0, dtype=tf.int64)
    ds = make_dataset(
        str(path), parse, 1, training=False, skip_corrupt=True, skipped_counter=counter
    )
    assert len(_batches(ds)) == total - 1
    assert int(counter.numpy()) == 1


def test_broken_frame_names_the_shard(shapes_records, tmp_path):
    path = tmp_path / "crc.tfrecord"
    _write_with_bad_record(shapes_records, path, -1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    parse = detection_parser(64, training=False)
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"shard .*crc.tfrecord.* is corrupt after record"
    ):
        _batches(make_dataset(str(path), parse, 2, training=False))
    counter = tf.Variable(0, dtype=tf.int64)
    ds = make_dataset(
        str(path), parse, 1, training=False, skip_corrupt=True, skipped_counter=counter
    )
    assert 0 < len(_batches(ds)) < 8
    assert int(counter.numpy()) == 1


def test_tfds_source_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    rng = np.random.default_rng(0)

    def as_dataset_fn(*args, **kwargs):
        examples = []
        for i in range(4):
            examples.append(
                {
                    "image": rng.integers(0, 255, (48, 64, 3), dtype=np.uint8),
                    "image/id": np.int64(100 + i),
                    "image/filename": f"{i}.jpg",
                    "objects": {
                        "area": np.array([100, 50], np.int64),
                        "bbox": np.array([[0.1, 0.1, 0.5, 0.5], [0.2, 0.3, 0.9, 0.8]], np.float32),
                        "id": np.array([1, 2], np.int64),
                        "is_crowd": np.array([False, i == 0]),
                        "label": np.array([0, 79], np.int64),
                    },
                }
            )
        return tf.data.Dataset.from_generator(
            lambda: iter(examples),
            output_signature={
                "image": tf.TensorSpec([None, None, 3], tf.uint8),
                "image/id": tf.TensorSpec([], tf.int64),
                "image/filename": tf.TensorSpec([], tf.string),
                "objects": {
                    "area": tf.TensorSpec([None], tf.int64),
                    "bbox": tf.TensorSpec([None, 4], tf.float32),
                    "id": tf.TensorSpec([None], tf.int64),
                    "is_crowd": tf.TensorSpec([None], tf.bool),
                    "label": tf.TensorSpec([None], tf.int64),
                },
            },
        )

    parse = detection_parser(64, training=False)
    with tfds.testing.mock_data(num_examples=4, as_dataset_fn=as_dataset_fn):
        ds = make_dataset(TFDSSource("coco/2017", "validation"), parse, 4, training=False)
        (image, gt), *_ = _batches(ds)
    assert image.shape == (4, 64, 64, 3)
    # Without deterministic=True, parallel decoding may reorder examples: sort by id.
    order = np.argsort(gt["source_id"])
    gt = {k: v[order] for k, v in gt.items()}
    np.testing.assert_array_equal(gt["source_id"], [100, 101, 102, 103])
    np.testing.assert_array_equal(gt["classes"][:, :3], [[1, 80, -1]] * 4)  # 0-79 -> 1-80
    np.testing.assert_allclose(gt["boxes"][0, 0], [4.8, 6.4, 24, 32], rtol=1e-4)
    np.testing.assert_array_equal(gt["is_crowd"][:, 1], [True, False, False, False])


@pytest.mark.parametrize("name", ["imagenet2012", "i_naturalist2017"])
def test_tfds_classification_with_mock_data(name):
    tfds = pytest.importorskip("tensorflow_datasets")
    from spinenet_tf.data.decoders import CLASSIFICATION_DECODERS
    from spinenet_tf.data.parsers import classification_parser

    with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
        builder = tfds.builder(name)
        num_classes = builder.info.features["label"].num_classes
        ds = make_dataset(
            TFDSSource(name, "validation"),
            classification_parser(32, training=False),
            4,
            training=False,
            decoders=CLASSIFICATION_DECODERS,
        )
        batches = _batches(ds)
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1]["label"] for b in batches])
    ids = np.concatenate([b[1]["source_id"] for b in batches])
    assert images.shape == (8, 32, 32, 3) and (ids >= 0).sum() == 5
    # TFDS numbers classes 0..K-1; they become 1..K (ImageNet: 1-1000, num_classes 1001).
    assert num_classes == {"imagenet2012": 1000, "i_naturalist2017": 5089}[name]
    assert ((labels >= 1) & (labels <= num_classes)).all()
    assert len(set(ids[ids >= 0])) == 5  # a hash of the file name or example id


def test_model_fit_on_make_dataset(shapes_records):
    """The notebook path: model.compile + model.fit on a make_dataset pipeline."""
    import keras

    from spinenet_tf import build_retinanet
    from tests.conftest import FIVE_BLOCKS, TINY

    model = build_retinanet("49S", 5, 64, **TINY, **FIVE_BLOCKS, head_num_convs=1)
    parse = detection_parser(
        64, training=True, scale_range=(0.8, 1.25), targets_fn=model.labeler.targets
    )
    ds = make_dataset(shapes_records["train"], parse, 4, training=True)
    model.compile(optimizer=keras.optimizers.SGD(0.005, momentum=0.9))
    history = model.fit(ds, steps_per_epoch=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_jittered_boxes_stay_on_their_pixels():
    """Whatever the scale and crop, a box still frames its object's pixels (to a pixel)."""
    h, w = 90, 120
    image = np.zeros((h, w, 3), np.uint8)
    image[30:60, 40:100] = 255
    d = {
        "image": tf.constant(image),
        "boxes": tf.constant([[30 / h, 40 / w, 60 / h, 100 / w]], tf.float32),
        "classes": tf.constant([1]),
        "is_crowd": tf.constant([False]),
        "areas": tf.constant([1800.0]),
    }
    checked = 0
    for seed in range(12):
        out = ops.resize_and_crop(d, (64, 64), (0.5, 2.5), [seed, 7])
        if out["boxes"].shape[0] == 0:
            continue
        checked += 1
        bright = np.argwhere(out["image"].numpy()[..., 0] > 127)
        ymin, xmin, ymax, xmax = out["boxes"][0].numpy()
        assert abs(bright[:, 0].min() - ymin) <= 1.0 and abs(bright[:, 0].max() + 1 - ymax) <= 1.0
        assert abs(bright[:, 1].min() - xmin) <= 1.0 and abs(bright[:, 1].max() + 1 - xmax) <= 1.0
        # image_info maps the box back to the original pixels.
        info = out["image_info"].numpy()
        back = (out["boxes"][0].numpy() + np.tile(info[3], 2)) / np.tile(info[2], 2)
        window = (np.tile(info[3], 2) + [0, 0, *out["image"].shape[:2]]) / np.tile(info[2], 2)
        expected = np.clip([30, 40, 60, 100], window[:2].tolist() * 2, window[2:].tolist() * 2)
        np.testing.assert_allclose(back, expected, atol=1e-3)
    assert checked >= 6


@pytest.mark.parametrize("size", [1, 8, 112])
def test_crop_and_resize_equals_tensorflows(size, rng):
    images = rng.uniform(0, 1, (6, 9, 13)).astype(np.float32)
    # Inside, partly outside, flipped and degenerate boxes.
    boxes = np.array(
        [
            [0.1, 0.2, 0.7, 0.9],
            [-0.3, 0.5, 0.4, 1.6],
            [0.0, 0.0, 1.0, 1.0],
            [0.8, 0.9, 0.2, 0.1],
            [0.5, 0.5, 0.5, 0.5],
            [1.2, -0.5, 1.4, -0.2],
        ],
        np.float32,
    )
    ours = ops.crop_and_resize(images, boxes, size)
    theirs = tf.image.crop_and_resize(images[..., None], boxes, tf.range(6), [size, size])
    np.testing.assert_allclose(ours, theirs[..., 0], atol=1e-6)
