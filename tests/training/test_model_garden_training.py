"""Training fidelity: from the same converted weights, on the same batch, our training loop and
Model Garden's RetinaNet task take the same steps.

Ours: `Trainer.train` (its loop, `_replica_step`, SGD and `WarmupSchedule`) on padded ground
truth matched in the graph. Model Garden's: `RetinaNetTask.build_model` (l2(weight_decay / 2)
kernel regularisers), labels from its `AnchorLabeler` on the unpadded boxes (as its parser
makes them), `RetinaNetTask.train_step` (build_losses, loss / replicas, apply_gradients) and
the optimizer of `OptimizerFactory` (legacy SGD, momentum 0.9, linear warm-up, stepwise
decay). Batch norm in training mode, weight decay and momentum on.

Settings made to agree with Model Garden:
- LossConfig.train_background=True: the focal loss includes channel 0 as an always-negative sigmoid;
- sync_batch_norm=True, Model Garden's use_sync_bn=True (its NormActivation default and its
  SpineNet recipes): both keep the biased batch variance in the moving variance. (Model
  Garden's fused batch norm, use_sync_bn=False, keeps the Bessel-corrected one; ours never.)
  On one replica our layer is then plain fused batch norm and Model Garden's computes
  E[x^2] - E[x]^2: the statistics differ in float rounding only;
- the learning rates: Model Garden's stepwise rate changes after its boundary (step >
  boundary), ours at fraction * total_steps (step >= boundary), so boundary 14 there is
  0.75 * 20 = 15 here; both warm up linearly from the warm-up rate at step 0 to the base rate
  at warmup_steps; our rate is per reference_batch_size images, set to the batch size.

The default-suite test runs the tests' five-block list (levels 3-5, FIVE_BLOCKS) on both
sides: tracing two 49S models and their training steps took 72 s of the suite, five blocks
31 s. The full-size test keeps 49S's blocks.

Both tests use norm_epsilon 0.1 on both sides and a learning rate at which the run is
well-conditioned: a random 1e-7 relative perturbation of the initial weights on one side alone
(Model Garden's) stays below 3e-7 of the loss over the 20 steps. Otherwise the float rounding
between two implementations grows into differences of the trajectory itself, on either side:
- 128 px, tiny, epsilon 1e-3: the level-6 and -7 maps are 2x2 and 1x1, so many batch-norm
  channels see 2 to 8 values spread by about sqrt(epsilon). After one step (lr 0.02) the two
  sides' weights differed by one ulp; that difference in the stem kernel alone changed the
  level-7 features by 13% and the losses by 2e-3 one step later. Model Garden alone, from a
  1e-7 perturbation, differed by 6e-3 at step 3, and by 1e-4 at step 7 even at lr 3e-5
  (max pooling then picks other maxima; with average pooling that growth disappears).
- 640 px, real 49S, epsilon 1e-3: the perturbation grew to 3e-3 by step 3 at lr 0.01 and to
  2e-2 by step 7 at lr 1e-3. At epsilon 0.1 the box loss diverged first: two sides differed
  by 3e-4 at step 5 at lr 0.01 and at step 11 at lr 0.004.
Epsilon 0.1 damps the head's batch norms (its towers start at small outputs, variance near
1e-3) and the few-value channels. At 128 px the learning rate 0.01 was still chaotic on one
side alone (7e-4 at step 16), 0.005 is not.
"""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import (
    FIVE_BLOCKS,
    HEAVY_MEMORY,
    TINY,
    model_garden,
    randomize_batch_norm_stats,
)

MODEL_ID = "49S"
NUM_CLASSES = 5
BATCH = 2
MAX_BOXES = 6
WEIGHT_DECAY = 4e-5
MOMENTUM = 0.9
WARMUP_STEPS = 5
DECAY_STEP = 15  # the first step at the decayed rate
DECAY = 0.1


@dataclasses.dataclass(frozen=True)
class Case:
    image_size: int
    learning_rate: float
    steps: int = 20
    norm_epsilon: float = 1e-3
    head: dict = dataclasses.field(default_factory=dict)  # head_num_convs / head_num_filters
    backbone: dict = dataclasses.field(default_factory=dict)  # width overrides, both sides
    # Another block list and its levels, both sides (default: 49S's, levels 3-7).
    blocks: dict = dataclasses.field(default_factory=dict)


TINY_CASE = Case(
    image_size=128,
    learning_rate=0.005,
    norm_epsilon=0.1,
    head=dict(head_num_convs=2, head_num_filters=16),
    backbone=TINY,
    blocks=FIVE_BLOCKS,
)


def _learning_rates(case: Case) -> np.ndarray:
    warmup_lr = case.learning_rate / 10
    step = np.arange(case.steps)
    warm = warmup_lr + (case.learning_rate - warmup_lr) * step / WARMUP_STEPS
    after = np.where(step >= DECAY_STEP, case.learning_rate * DECAY, case.learning_rate)
    return np.where(step < WARMUP_STEPS, warm, after)


def _batch(image_size: int, rng):
    """Smooth random images and a few random boxes per image, padded to MAX_BOXES."""
    cells = image_size // 8
    noise = rng.normal(0.0, 1.0, (BATCH, cells, cells, 3)).astype("float32")
    images = tf.image.resize(noise, (image_size, image_size)).numpy()
    boxes = np.zeros((BATCH, MAX_BOXES, 4), np.float32)
    classes = np.full((BATCH, MAX_BOXES), -1, np.int32)
    for b, count in enumerate((4, 3)):
        for i in range(count):
            h, w = rng.uniform(0.1, 0.6, 2) * image_size
            y, x = rng.uniform(0, image_size - h), rng.uniform(0, image_size - w)
            boxes[b, i] = [y, x, y + h, x + w]
            classes[b, i] = rng.integers(1, NUM_CLASSES)
    return images, {"boxes": boxes, "classes": classes}


def _assert_same_targets(model, labels, groundtruth):
    from official.vision.losses.loss_utils import multi_level_flatten

    ours = {k: v.numpy() for k, v in model.labeler.targets(groundtruth).items()}
    positive = ours["box_weights"] > 0
    assert positive.sum() > 20
    np.testing.assert_array_equal(ours["box_weights"], labels["box_weights"].numpy())
    np.testing.assert_array_equal(ours["cls_weights"], labels["cls_weights"].numpy())
    # Model Garden's unmatched anchors have class -1 (an all-zero one-hot), ours 0.
    theirs_cls = multi_level_flatten(labels["cls_targets"]).numpy()
    np.testing.assert_array_equal(ours["cls_targets"], np.maximum(theirs_cls, 0))
    theirs_box = multi_level_flatten(labels["box_targets"], last_dim=4).numpy()
    np.testing.assert_allclose(ours["box_targets"][positive], theirs_box[positive], atol=1e-5)


def _train_model_garden(task, model, optimizer, images, labels, steps):
    metrics = task.build_metrics(training=True)

    @tf.function
    def step(images, labels):
        return task.train_step((images, labels), model, optimizer, metrics)

    history = []
    for _ in range(steps):
        lr = float(optimizer._decayed_lr(tf.float32))  # the rate of the coming update
        for m in metrics:  # so that each metric is this step's value
            m.reset_state()
        logs = step(images, labels)
        history.append({"lr": lr, **{m.name: float(logs[m.name]) for m in metrics}})
    return history


def _run(case: Case, tmp_path, monkeypatch):
    model_garden()
    from official.vision.modeling.backbones import spinenet as mg_spinenet

    from spinenet_tf.convert import from_model_garden
    from spinenet_tf.convert.model_garden import (
        build_model_garden_retinanet_task,
        build_model_garden_sgd,
        model_garden_retinanet_labels,
    )
    from spinenet_tf.training.trainer import (
        DataConfig,
        ExperimentConfig,
        OptimizerConfig,
        Trainer,
    )

    rng = np.random.default_rng(0)
    if case.backbone:
        # Model Garden takes a SpineNet's widths from this table only.
        scaling = {**mg_spinenet.SCALING_MAP[MODEL_ID], **case.backbone}
        monkeypatch.setitem(mg_spinenet.SCALING_MAP, MODEL_ID, scaling)
    levels = {}
    if case.blocks:
        # ... and its blocks from this list only.
        monkeypatch.setattr(mg_spinenet, "SPINENET_BLOCK_SPECS", case.blocks["block_specs"])
        levels = {k: case.blocks[k] for k in ("min_level", "max_level")}
    task = build_model_garden_retinanet_task(
        MODEL_ID,
        NUM_CLASSES,
        case.image_size,
        WEIGHT_DECAY,
        norm_epsilon=case.norm_epsilon,
        use_sync_bn=True,
        **case.head,
        **levels,
    )
    mg_model = task.build_model()
    size = case.image_size
    # The head creates its variables on the first call, in forward order.
    mg_model(np.zeros([1, size, size, 3], np.float32), training=False)
    randomize_batch_norm_stats(mg_model, rng)
    mg_optimizer = build_model_garden_sgd(
        task,
        case.learning_rate,
        MOMENTUM,
        WARMUP_STEPS,
        case.learning_rate / 10,
        boundaries=[DECAY_STEP - 1],  # the rate changes once step > boundary
        values=[case.learning_rate, case.learning_rate * DECAY],
    )

    config = ExperimentConfig(
        model_id=MODEL_ID,
        num_classes=NUM_CLASSES,
        image_size=size,
        model_overrides=dict(
            case.backbone,
            **case.blocks,
            **case.head,
            weight_decay=WEIGHT_DECAY,
            norm_epsilon=case.norm_epsilon,
            loss={"train_background": True},
        ),
        train=DataConfig(global_batch_size=BATCH),
        optimizer=OptimizerConfig(
            learning_rate=case.learning_rate,
            reference_batch_size=BATCH,
            momentum=MOMENTUM,
            warmup_steps=WARMUP_STEPS,
            warmup_learning_rate=case.learning_rate / 10,
            decay="step",
            boundaries=(DECAY_STEP / case.steps,),
            multipliers=(DECAY,),
        ),
        train_steps=case.steps,
        steps_per_loop=1,
        checkpoint_every=case.steps,
        sync_batch_norm=True,
    )
    trainer = Trainer(config, str(tmp_path / "ours"))
    model = trainer.model
    from_model_garden(mg_model, model)

    images, groundtruth = _batch(size, rng)
    labels = model_garden_retinanet_labels(task, groundtruth)
    _assert_same_targets(model, labels, groundtruth)
    # Both regularisers see the same kernels.
    np.testing.assert_allclose(
        float(tf.add_n(model.losses)), float(tf.add_n(mg_model.losses)), rtol=1e-6
    )

    # Our loop on the fixed batch, in place of the files it would read.
    dataset = tf.data.Dataset.from_tensors((images, groundtruth)).repeat()
    monkeypatch.setattr(trainer, "dataset", lambda training: dataset)
    first_lr = float(trainer.optimizer.learning_rate)
    trainer.train()
    ours = trainer.history
    theirs = _train_model_garden(
        task, mg_model, mg_optimizer, tf.constant(images), labels, case.steps
    )
    assert [h["step"] for h in ours] == list(range(1, case.steps + 1))

    # The same learning rate at every step: history's lr is the rate after the step.
    expected = _learning_rates(case)
    our_lr = [first_lr] + [h["lr"] for h in ours[:-1]]
    np.testing.assert_allclose(our_lr, expected, rtol=1e-6)
    np.testing.assert_allclose([h["lr"] for h in theirs], expected, rtol=1e-6)

    # Per-step losses. Model Garden's total_loss includes the L2 term, as does ours;
    # its model_loss is our total without it.
    pairs = {
        "total_loss": ("total_loss", lambda h: h["total_loss"]),
        "cls_loss": ("cls_loss", lambda h: h["cls_loss"]),
        "box_loss": ("box_loss", lambda h: h["box_loss"]),
        "model_loss": ("model_loss", lambda h: h["total_loss"] - h["reg_loss"]),
    }
    rel = {}
    for name, (theirs_key, get) in pairs.items():
        a = np.array([get(h) for h in ours])
        b = np.array([h[theirs_key] for h in theirs])
        rel[name] = np.abs(a - b) / np.abs(b)
    worst = {k: float(v.max()) for k, v in rel.items()}
    print(f"\nmax relative loss difference over {case.steps} steps: {worst}")
    print("per step (total, cls, box):")
    for s in range(case.steps):
        print(
            f"  {s:2d} {theirs[s]['total_loss']:.6f} "
            + " ".join(f"{rel[k][s]:.1e}" for k in ("total_loss", "cls_loss", "box_loss"))
        )
    for name in ("total_loss", "cls_loss", "box_loss"):
        assert worst[name] <= 1e-4, (name, rel[name])
    # Training moved the weights: the loss fell.
    assert theirs[-1]["total_loss"] < 0.98 * theirs[0]["total_loss"]

    # Weights after training: Model Garden's copied into ours by the converter, compared by
    # path with ours; every variable, moving statistics included.
    trained = {v.path: v.numpy() for v in model.weights}
    from_model_garden(mg_model, model)
    scale = max(float(np.max(np.abs(w))) for w in trained.values())
    drift = {v.path: float(np.max(np.abs(v.numpy() - trained[v.path]))) for v in model.weights}
    worst_path = max(drift, key=drift.get)
    trainable = max(drift[v.path] for v in model.trainable_weights)
    print(
        f"weight drift after {case.steps} steps: {drift[worst_path]:.2e} ({worst_path}), "
        f"trainable {trainable:.2e}; largest weight {scale:.3f}"
    )
    assert drift[worst_path] <= 1e-3 * scale, (worst_path, drift[worst_path], scale)


def test_training_steps_equal_model_garden(tmp_path, monkeypatch):
    _run(TINY_CASE, tmp_path, monkeypatch)


@pytest.mark.slow
@HEAVY_MEMORY
def test_training_steps_equal_model_garden_full_size(tmp_path, monkeypatch):
    _run(Case(image_size=640, learning_rate=6e-4, norm_epsilon=0.1), tmp_path, monkeypatch)
