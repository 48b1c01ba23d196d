"""A user's own task, defined in this file, plugs in without editing the trainer: bound in a
gin file, trained and evaluated by the train command's main, exported by the export API."""

import dataclasses

import gin
import keras
import numpy as np
import tensorflow as tf
from absl import flags

from spinenet_tf.data.parsers import detection_parser
from spinenet_tf.models.spinenet import build_backbone
from spinenet_tf.serving.export import export_saved_model
from spinenet_tf.serving.load import load_model
from spinenet_tf.tasks import ImageServing, Task, model_settings
from spinenet_tf.training import gin_bindings
from tests.conftest import FIVE_BLOCKS, TINY


@dataclasses.dataclass(frozen=True)
class BoxCountTask(Task):
    """Regresses the number of objects in an image from a SpineNet's pooled features."""

    def build_model(self, config):
        size = config.image_size
        backbone = build_backbone(
            config.model_id,
            input_shape=(size, size, 3),
            **{"min_level": 3, "max_level": 5, **model_settings(config)},
        )
        image = keras.Input((size, size, 3), name="image")
        features = backbone(image)
        pooled = keras.layers.Concatenate(name="pool")(
            [keras.layers.GlobalAveragePooling2D()(features[k]) for k in sorted(features)]
        )
        count = keras.layers.Dense(1, name="count")(pooled)
        return keras.Model(image, count, name="box_counter")

    def parser(self, model, config, training):
        data = config.train if training else config.eval
        detection = detection_parser(
            config.image_size, training=training, max_instances=data.max_instances
        )

        def parse(decoded, seed=None):
            image, labels = detection(decoded, seed)
            out = {"count": tf.cast(labels["num_instances"], tf.float32)}
            if not training:
                out["source_id"] = labels["source_id"]
            return image, out

        return parse

    def train_targets(self, model, labels, global_sum):
        images = tf.cast(tf.shape(labels["count"])[0], tf.float32)
        return {**labels, "global_batch": global_sum(images)}

    def train_losses(self, model, targets, outputs):
        error = tf.cast(outputs[:, 0], tf.float32) - targets["count"]
        return {"total_loss": tf.reduce_sum(error**2) / targets["global_batch"]}

    def eval_outputs(self, model, images, groundtruth):
        return {"count": model(images, training=False)[:, 0]}

    def evaluator(self, config):
        return CountError()

    def serving_module(self, model, label_map=None, jit_compile=False):
        return CountServing(model)


# Once per process: gin refuses a second registration of the same name.
gin_bindings.register_task(BoxCountTask)


class CountError:
    """Mean absolute error of the counts over the real images of the evaluation batches."""

    def __init__(self):
        self.errors = []

    def update(self, outputs, groundtruth):
        real = np.asarray(groundtruth["source_id"]) >= 0
        error = np.abs(np.asarray(outputs["count"]) - np.asarray(groundtruth["count"]))
        self.errors.extend(error[real].tolist())

    def result(self):
        return {"count_mae": float(np.mean(self.errors)), "images": float(len(self.errors))}

    def write(self, directory, step):
        pass


class CountServing(ImageServing):
    def __init__(self, model):
        super().__init__(model.input_shape[1:3])
        self.model = model

    def serve(self, padded, image_info):
        return {"count": tf.cast(self.model(padded, training=False)[:, 0], tf.float32)}


def test_a_task_of_its_own_trains_evaluates_and_exports(shapes_records, tmp_path):
    from spinenet_tf import train

    gin_file = tmp_path / "count.gin"
    gin_file.write_text(
        "\n".join(
            [
                "ExperimentConfig.task = @BoxCountTask()",
                "ExperimentConfig.model_id = '49S'",
                "ExperimentConfig.image_size = 64",
                f"ExperimentConfig.model_overrides = {dict(TINY, **FIVE_BLOCKS)!r}",
                "ExperimentConfig.train = @train/DataConfig()",
                "ExperimentConfig.eval = @eval/DataConfig()",
                f"train/DataConfig.source = '{shapes_records['train']}'",
                "train/DataConfig.global_batch_size = 4",
                "train/DataConfig.shuffle_buffer = 0",
                f"eval/DataConfig.source = '{shapes_records['val']}'",
                "eval/DataConfig.global_batch_size = 4",
                "ExperimentConfig.optimizer = @OptimizerConfig()",
                "OptimizerConfig.learning_rate = 0.64",
                "OptimizerConfig.warmup_steps = 0",
                "ExperimentConfig.train_steps = 2",
                "ExperimentConfig.steps_per_loop = 2",
                "ExperimentConfig.checkpoint_every = 2",
                "ExperimentConfig.seed = 0",
            ]
        )
    )
    model_dir = tmp_path / "run"
    argv = ["train", f"--gin_file={gin_file}", f"--model_dir={model_dir}"]
    gin.clear_config()
    try:
        flags.FLAGS(argv)
        train.main(argv[:1])
        config = gin_bindings.experiment_config()
    finally:
        flags.FLAGS.unparse_flags()
        gin.clear_config()
    assert isinstance(config.task, BoxCountTask)
    assert tf.train.latest_checkpoint(model_dir).endswith("ckpt-2")
    metrics = (model_dir / "eval_2.json").read_text()
    assert '"count_mae"' in metrics and '"images": 8.0' in metrics

    try:
        task, model, _ = load_model([str(gin_file)], [], str(model_dir))
    finally:
        gin.clear_config()
    assert isinstance(task, BoxCountTask) and model.name == "box_counter"
    export_saved_model(model, str(tmp_path / "export"), input_types=["image_tensor"], task=task)
    serve = tf.saved_model.load(str(tmp_path / "export")).signatures["image_tensor"]
    image = np.random.default_rng(0).integers(0, 255, (2, 48, 80, 3), dtype=np.uint8)
    counts = serve(inputs=tf.constant(image))["count"]
    assert counts.shape == (2,) and np.all(np.isfinite(counts))
