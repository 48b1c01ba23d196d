"""An experiment as data: what to build, what to read, how to optimise, how long to run.

Plain dataclasses; .gin files fill them through `spinenet_tf.training.gin_bindings`.
"""

from __future__ import annotations

import dataclasses

from spinenet_tf.tasks.base import Task
from spinenet_tf.tasks.retinanet import RetinaNetTask


@dataclasses.dataclass
class DataConfig:
    """One split's input.

    Attributes:
        source: a TFRecord pattern (local or gs://) or 'tfds:NAME:SPLIT' (e.g.
            'tfds:coco/2017:validation'); empty with ExperimentConfig.synthetic_data_dir: the
            synthetic shapes data.
        global_batch_size: images per step over all replicas.
        scale_range: (low, high) random rescaling before the crop, training only (the paper's
            scale jitter is (0.5, 2.0)); (1, 1) is none.
        max_instances: ground-truth instances kept per image (labels are padded to it).
        shuffle_buffer: examples in the training shuffle buffer; 0 keeps the file order.
        cache: keep the decoded split in memory after the first pass.
        skip_corrupt: drop records that fail to decode instead of stopping.
        annotation_file: evaluation ground truth (COCO JSON); empty: rebuilt from the records.
    """

    source: str = ""
    global_batch_size: int = 64
    scale_range: tuple = (1.0, 1.0)
    max_instances: int = 100
    shuffle_buffer: int = 1024
    cache: bool = False
    skip_corrupt: bool = False
    annotation_file: str = ""


OPTIMIZERS = ("sgd", "adam")


@dataclasses.dataclass
class OptimizerConfig:
    """SGD with momentum (or Adam), linear warm-up and a decay.

    Attributes:
        name: 'sgd' (with momentum: the papers' and the references') or 'adam' (Keras's
            Adam, betas 0.9 / 0.999, epsilon 1e-7; weight decay stays the model's L2 loss).
        learning_rate: the rate for reference_batch_size images, scaled linearly with the
            global batch size (the paper: 0.28 at 256).
        reference_batch_size: the batch size learning_rate is given for.
        momentum: SGD momentum (unused by Adam).
        warmup_steps: steps of linear warm-up from warmup_learning_rate.
        warmup_learning_rate: the rate at step 0 (scaled like learning_rate).
        decay: 'step' (multipliers at boundaries) or 'cosine' (to 0 at train_steps).
        boundaries: fractions of train_steps where the step decay applies each multiplier.
        multipliers: the step decay's factors of learning_rate, one per boundary.
        global_clipnorm: clip the gradients' global norm to this; None: no clipping.
    """

    learning_rate: float = 0.28
    name: str = "sgd"
    reference_batch_size: int = 256
    momentum: float = 0.9
    warmup_steps: int = 2000
    warmup_learning_rate: float = 0.0
    decay: str = "step"
    boundaries: tuple = (0.9, 0.97)
    multipliers: tuple = (0.1, 0.01)
    global_clipnorm: float | None = None

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"OptimizerConfig.name {self.name!r} is not one of {OPTIMIZERS}")


@dataclasses.dataclass
class ExperimentConfig:
    """A whole experiment: task, model, data, optimiser and run settings.

    Attributes:
        task: what is trained (model, labels, losses, evaluation, serving), e.g.
            `RetinaNetTask()`, the default; gin: `ExperimentConfig.task = @RetinaNetTask()`.
        model_id: SpineNet variant ('49S', '49', '96', '143', '190', 'Mobile-49', ...).
        num_classes: classifier outputs, background (0) included: the largest category id + 1;
            None: taken from the data's label map (the trainer stops before building anything
            when a category id does not fit).
        image_size: the square input size in pixels.
        model_overrides: model builder arguments (backbone, head, matching, decoding, e.g.
            {'filter_size_scale': 0.5, 'unmatched_iou': 0.4}).
        train: the training split.
        eval: the evaluation split.
        optimizer: optimiser and learning-rate schedule.
        train_steps: steps to train to (a resumed run continues up to it).
        steps_per_loop: steps per host loop (one tf.function call; metrics are their mean).
        checkpoint_every: steps between checkpoints (and evaluations in train_and_eval).
        keep_checkpoints: checkpoints kept on disk, the latest ones.
        eval_steps: evaluation batches; None: the whole evaluation split.
        dtype_policy: Keras dtype policy: float32, mixed_bfloat16 (TPU) or mixed_float16 (GPU,
            with loss scaling).
        jit_compile: compile the train and eval steps with XLA.
        sync_batch_norm: batch statistics over the global batch, so any replica count gives
            the same run (with one replica it is plain, fused batch norm). False: each
            replica's own statistics.
        seed: seed of input order, augmentation and (deterministic) weight initialisation.
        deterministic: fixed input order and augmentation, TF op determinism (process-wide),
            and resumption that replays the input: a resumed run ends with an uninterrupted
            run's weights. Each step is its own graph call (no while loop over
            steps_per_loop, with which runs of one seed parted on CPU). Not with jit_compile:
            XLA has no deterministic MaxPool gradient.
        num_vis_images: evaluation images saved with the task's drawing of its outputs.
        synthetic_data_dir: when set, the synthetic shapes dataset is generated there (if
            absent) and used for any split without a source.
        synthetic_data_args: arguments of the task's synthetic data generator
            (`spinenet_tf.data.shapes.ensure_dataset` for RetinaNet).
        init_checkpoint: a checkpoint (prefix or directory) of another experiment, or a
            converted Model Garden one, to start from when model_dir has none; its backbone
            must be this model's (`spinenet_tf.training.checkpoints.init_from_checkpoint`).
        init_scope: what init_checkpoint loads: 'all' (the backbone and every other
            variable of the same path and shape, e.g. a detector's head; a class output for
            other classes stays fresh) or 'backbone'.
    """

    task: Task = dataclasses.field(default_factory=RetinaNetTask)
    model_id: str = "49S"
    num_classes: int | None = None
    image_size: int = 640
    model_overrides: dict = dataclasses.field(default_factory=dict)
    train: DataConfig = dataclasses.field(default_factory=DataConfig)
    eval: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    train_steps: int = 1000
    steps_per_loop: int = 100
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    eval_steps: int | None = None
    dtype_policy: str = "float32"
    jit_compile: bool = False
    sync_batch_norm: bool = True
    seed: int | None = None
    deterministic: bool = False
    num_vis_images: int = 0
    synthetic_data_dir: str = ""
    synthetic_data_args: dict = dataclasses.field(default_factory=dict)
    init_checkpoint: str = ""
    init_scope: str = "all"


def prepare_synthetic_data(config):
    """Fills empty data sources from the task's synthetic dataset (RetinaNet: the shapes
    detection data), generating it if absent."""
    if not config.synthetic_data_dir:
        return config
    paths = config.task.synthetic_data(config.synthetic_data_dir, **config.synthetic_data_args)
    train = config.train
    if not train.source:
        train = dataclasses.replace(train, source=paths["train"])
    evaluation = config.eval
    if not evaluation.source:
        evaluation = dataclasses.replace(
            evaluation, source=paths["val"], annotation_file=paths["label_map"]
        )
    return dataclasses.replace(config, train=train, eval=evaluation)
