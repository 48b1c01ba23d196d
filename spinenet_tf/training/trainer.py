"""The training loop: our own loop over Keras 3 layers and optimizers, under any strategy.

Keras's model.fit fails under MultiWorkerMirroredStrategy in Keras 3.15 (keras-team/keras#20585),
so training runs `strategy.run` inside a tf.function, several steps per host loop, with the
optimizer built inside the strategy scope before the first step (keras-team/keras#23085).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import tempfile
import time

import keras
import tensorflow as tf

from spinenet_tf.data.dataset import data_source, make_dataset
from spinenet_tf.data.label_map import data_classes
from spinenet_tf.tasks.base import replica_sum
from spinenet_tf.training import strategy as strategy_lib
from spinenet_tf.training.checkpoints import by_path, init_from_checkpoint, model_variables
from spinenet_tf.training.config import DataConfig, ExperimentConfig, OptimizerConfig
from spinenet_tf.training.optimizers import SGD, Adam
from spinenet_tf.training.schedules import WarmupSchedule
from spinenet_tf.visualize import contact_sheet

log = logging.getLogger("spinenet_tf")

# The configs moved to spinenet_tf.training.config; importing them from here still works.
__all__ = ["DataConfig", "ExperimentConfig", "OptimizerConfig", "Trainer", "TrainingDiverged"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class Trainer:
    """Builds model, optimizer and checkpoints under `strategy` and runs train / eval.

    What is trained is `config.task`'s business (model, parser, targets, losses, evaluation,
    drawings); the trainer owns the loop around it.
    """

    def __init__(self, config: ExperimentConfig, model_dir: str, strategy=None):
        # Class names of the experiment's data, for drawings ({} if it has none).
        num_classes, self.label_map = data_classes(config)
        config = dataclasses.replace(config, num_classes=num_classes)
        self.config = config
        self.model_dir = str(model_dir)
        self.strategy = strategy or tf.distribute.get_strategy()
        self.chief = strategy_lib.is_chief(self.strategy)
        self.task = config.task
        keras.config.set_dtype_policy(config.dtype_policy)
        if config.deterministic:
            keras.utils.set_random_seed(config.seed or 0)
            tf.config.experimental.enable_op_determinism()
        with self.strategy.scope():
            self.model = self.task.build_model(config)
            self.optimizer = self._build_optimizer()
            self.optimizer.build(self.model.trainable_variables)
        # Variables by path, not tf.train.Checkpoint(model=...): Keras 3 models do not expose
        # every variable to TF's object graph (a RetinaNet head's batch-norm statistics were
        # silently left out), and paths stay stable across processes.
        self.checkpoint = tf.train.Checkpoint(
            model=model_variables(self.model),
            # Optimizer paths start with its auto-numbered name (sgd, sgd_1, ...): drop it.
            optimizer=by_path(self.optimizer.variables, lambda p: p.split("/", 1)[-1]),
        )
        directory = self.model_dir if self.chief else _worker_dir(self.model_dir, self.strategy)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, directory, max_to_keep=config.keep_checkpoints
        )
        self._stop_requested = False
        self._initialized = False  # from config.init_checkpoint
        self.history: list[dict] = []  # metrics of each host loop of this process
        self.last_eval: dict | None = None  # metrics of the latest evaluate()
        self._train_loop = None
        self._eval_step = None

    # -- set-up ----------------------------------------------------------------------------
    def _build_optimizer(self):
        c = self.config.optimizer
        lr = c.learning_rate * self.config.train.global_batch_size / c.reference_batch_size
        warmup_lr = (
            c.warmup_learning_rate * self.config.train.global_batch_size / (c.reference_batch_size)
        )
        schedule = WarmupSchedule(
            lr,
            self.config.train_steps,
            c.warmup_steps,
            warmup_lr,
            c.decay,
            c.boundaries,
            c.multipliers,
        )
        if c.name == "adam":
            optimizer = Adam(schedule, global_clipnorm=c.global_clipnorm)
        else:
            optimizer = SGD(schedule, momentum=c.momentum, global_clipnorm=c.global_clipnorm)
        if self.config.dtype_policy == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        return optimizer

    @property
    def step(self) -> int:
        return int(self.optimizer.iterations.numpy())

    def dataset(self, training: bool) -> tf.distribute.DistributedDataset:
        data = self.config.train if training else self.config.eval
        parser = self.task.parser(self.model, self.config, training)

        def dataset_fn(input_context):
            ds = make_dataset(
                data_source(data.source),
                parser,
                data.global_batch_size,
                training=training,
                input_context=input_context,
                decoders=self.task.decoders,
                shuffle_buffer=data.shuffle_buffer,
                deterministic=self.config.deterministic,
                seed=self.config.seed,
                skip_corrupt=data.skip_corrupt,
                cache=data.cache,
            )
            if training and self.config.deterministic:
                # Replay the input up to the restored step, so that a resumed run sees the
                # batches an uninterrupted one would (and ends with equal weights).
                per_step = input_context.num_replicas_in_sync // input_context.num_input_pipelines
                ds = ds.skip(self.step * per_step)
            return ds

        return self.strategy.distribute_datasets_from_function(dataset_fn)

    # -- training --------------------------------------------------------------------------
    def _replica_step(self, images, labels):
        model, optimizer, task = self.model, self.optimizer, self.task
        context = tf.distribute.get_replica_context()
        targets = task.train_targets(model, labels, replica_sum)
        # Each replica's task loss is its share of the global-batch loss, so the replicas'
        # losses sum to the single-device loss of that batch; Keras then sums the replicas'
        # gradients. Weight decay is the same on every replica: 1/n each.
        replicas = context.num_replicas_in_sync
        with tf.GradientTape() as tape:
            outputs = task.train_outputs(model, images, targets)
            losses = task.train_losses(model, targets, outputs)
            reg = tf.add_n([tf.cast(x, tf.float32) for x in model.losses]) if model.losses else 0.0
            loss = losses["total_loss"] + reg / replicas
            if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
                loss = optimizer.scale_loss(loss)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        names = self.task.train_loss_names
        if set(names) - set(losses) or "total_loss" not in losses:
            raise ValueError(
                f"{type(task).__name__}.train_losses returned {sorted(losses)}; expected "
                f"'total_loss' and every name of its train_loss_names {names}"
            )
        return {
            **{k: losses[k] for k in names if k != "total_loss"},
            "task_loss": losses["total_loss"],
            "reg_loss": tf.convert_to_tensor(reg, tf.float32) / replicas,
        }

    def _make_train_loop(self):
        strategy = self.strategy
        replica_step = tf.function(self._replica_step, jit_compile=self.config.jit_compile)
        names = [k for k in self.task.train_loss_names if k != "total_loss"]
        keys = (*names, "task_loss", "reg_loss")

        def step_sums(iterator, sums):
            per_replica = strategy.run(replica_step, args=next(iterator))
            # Each replica holds its share of the global-batch loss: sum them.
            return {
                k: sums[k] + strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
                for k, v in per_replica.items()
            }

        def means(sums, num_steps):
            out = {k: v / tf.cast(num_steps, tf.float32) for k, v in sums.items()}
            out["total_loss"] = out.pop("task_loss") + out["reg_loss"]
            return out

        if self.config.deterministic:
            # One compiled step per call, looped here: with the steps in a graph while loop
            # (as below) two runs with the same seed parted from step 2-7 on CPU, even in one
            # process, whenever the loop carried the losses (TF 2.20; without the losses, or
            # without the while loop, every run was bit-identical).
            one_step = tf.function(step_sums)

            def loop(iterator, num_steps):
                sums = {k: tf.constant(0.0) for k in keys}
                for _ in range(int(num_steps)):
                    sums = one_step(iterator, sums)
                return means(sums, num_steps)

            return loop

        @tf.function
        def loop(iterator, num_steps):
            sums = {k: tf.constant(0.0) for k in keys}
            for _ in tf.range(num_steps):
                sums = step_sums(iterator, sums)
            return means(sums, num_steps)

        return loop

    def _request_stop(self, signum, frame):
        log.warning("signal %d: saving a checkpoint at the end of this loop, then stopping", signum)
        self._stop_requested = True

    def restore(self) -> int:
        """Restores the latest checkpoint, if any; else, with config.init_checkpoint, starts
        from that checkpoint's weights (see `init_from_checkpoint`). Returns the step."""
        latest = self.manager.latest_checkpoint
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
            log.info("restored %s at step %d", latest, self.step)
        elif self.config.init_checkpoint and not self._initialized:
            report = init_from_checkpoint(
                self.model, self.config.init_checkpoint, self.config.init_scope
            )
            self._initialized = True
            log.info("%s", report.summary())
        return self.step

    def train(self, evaluate_every_checkpoint: bool = False) -> dict:
        """Trains to config.train_steps from the latest checkpoint; returns the last losses."""
        config = self.config
        self.restore()
        if self.chief:
            tf.io.gfile.makedirs(self.model_dir)
        if self._train_loop is None:
            self._train_loop = self._make_train_loop()
        iterator = iter(self.dataset(training=True))
        writer = self._writer("train")
        previous = signal.signal(signal.SIGTERM, self._request_stop)
        # Every value shown is the latest host loop's, not a running mean since the start.
        progress = keras.utils.Progbar(
            config.train_steps,
            stateful_metrics=[*self.task.train_loss_names, "reg_loss", "lr", "images/s"],
        )
        progress.update(self.step)
        metrics: dict = {}
        try:
            while self.step < config.train_steps and not self._stop_requested:
                steps = min(
                    config.steps_per_loop,
                    config.train_steps - self.step,
                    config.checkpoint_every - self.step % config.checkpoint_every,
                )
                start = time.perf_counter()
                metrics = {
                    k: float(v) for k, v in self._train_loop(iterator, tf.constant(steps)).items()
                }
                seconds = time.perf_counter() - start
                step = self.step
                if not all(math.isfinite(v) for v in metrics.values()):
                    raise TrainingDiverged(
                        f"loss is not finite at step {step} ({metrics}); the last checkpoint, "
                        f"{self.manager.latest_checkpoint}, is untouched. Lower the learning rate "
                        "or add gradient clipping (OptimizerConfig.global_clipnorm)."
                    )
                lr = float(self.optimizer.learning_rate)
                metrics["images/s"] = steps * config.train.global_batch_size / seconds
                metrics["lr"] = lr
                self.history.append({"step": step, **metrics})
                progress.update(step, [(k, v) for k, v in metrics.items()])
                self._write_summaries(writer, step, metrics)
                if step % config.checkpoint_every == 0 or step == config.train_steps:
                    self._save(step)
                    if evaluate_every_checkpoint:
                        self.last_eval = self.evaluate()
            if self._stop_requested:
                self._save(self.step)
        finally:
            signal.signal(signal.SIGTERM, previous)
        return metrics

    def _save(self, step: int):
        # Every worker saves (collectives need them all); only the chief's copy is kept.
        self.manager.save(checkpoint_number=step)
        if not self.chief:
            tf.io.gfile.rmtree(self.manager.directory)

    def _writer(self, name: str):
        if not self.chief:
            return tf.summary.create_noop_writer()
        return tf.summary.create_file_writer(os.path.join(self.model_dir, name))

    @staticmethod
    def _write_summaries(writer, step: int, metrics: dict):
        with writer.as_default(step=step):
            for k, v in metrics.items():
                tf.summary.scalar(k, v)
        writer.flush()

    # -- evaluation ------------------------------------------------------------------------
    def _make_eval_step(self):
        model, strategy, task = self.model, self.strategy, self.task

        def replica_step(images, groundtruth):
            return task.eval_outputs(model, images, groundtruth), groundtruth

        replica_step = tf.function(replica_step, jit_compile=self.config.jit_compile)

        @tf.function
        def step(batch):
            outputs = strategy.run(replica_step, args=batch)
            return tf.nest.map_structure(lambda x: strategy.gather(x, axis=0), outputs)

        return step

    def evaluate(self) -> dict[str, float]:
        """The task's metrics (COCO box AP for RetinaNet) of the current weights on the
        evaluation split, written as JSON and to TensorBoard under model_dir (with the task's
        drawings of the first images when config.num_vis_images > 0)."""
        config = self.config
        if self._eval_step is None:
            self._eval_step = self._make_eval_step()
        evaluator = self.task.evaluator(config)
        drawn = []
        for i, batch in enumerate(self.dataset(training=False)):
            if config.eval_steps is not None and i >= config.eval_steps:
                break
            outputs, groundtruth = self._eval_step(batch)
            outputs = tf.nest.map_structure(lambda x: x.numpy(), outputs)
            groundtruth = tf.nest.map_structure(lambda x: x.numpy(), groundtruth)
            evaluator.update(outputs, groundtruth)
            if len(drawn) < config.num_vis_images:
                images = self.strategy.gather(batch[0], axis=0).numpy()
                drawn += self.task.draw(images, outputs, groundtruth, self.label_map)
        metrics = evaluator.result()
        self.last_eval = metrics
        step = self.step
        log.info("step %d: %s", step, ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        if self.chief:
            # tf.io.gfile throughout: model_dir may be gs://.
            out = self.model_dir
            tf.io.gfile.makedirs(out)
            with tf.io.gfile.GFile(os.path.join(out, f"eval_{step}.json"), "w") as f:
                f.write(json.dumps({"step": step, **metrics}, indent=1))
            evaluator.write(out, step)
            self._write_summaries(self._writer("eval"), step, metrics)
            if drawn:
                self._write_drawings(drawn[: config.num_vis_images], step)
        return metrics

    def _write_drawings(self, drawn: list, step: int):
        """model_dir/images/step{N}_image{id}.png each, and step{N}_sheet.png: all in one."""
        directory = os.path.join(self.model_dir, "images")
        tf.io.gfile.makedirs(directory)

        def save(image, name):
            with tf.io.gfile.GFile(os.path.join(directory, name), "wb") as f:
                image.save(f, format="PNG")

        for source_id, image in drawn:
            save(image, f"step{step}_image{source_id}.png")
        sheet = contact_sheet(
            [(f"image {source_id}", image) for source_id, image in drawn],
            legend=self.task.sheet_legend,
        )
        save(sheet, f"step{step}_sheet.png")
        log.info("evaluation images: %s", os.path.join(directory, f"step{step}_sheet.png"))

    def continuous_eval(self, timeout: float | None = None) -> dict:
        """Evaluates each new checkpoint until the one at train_steps (or `timeout` seconds
        without a new checkpoint)."""
        metrics = {}
        for path in tf.train.checkpoints_iterator(self.manager.directory, timeout=timeout):
            self.checkpoint.restore(path).expect_partial()
            metrics = self.evaluate()
            if self.step >= self.config.train_steps:
                break
        return metrics


def _worker_dir(model_dir: str, strategy) -> str:
    """A scratch directory for a non-chief worker's checkpoint writes (removed after each)."""
    resolver = strategy.cluster_resolver
    return tempfile.mkdtemp(prefix=f"spinenet_{resolver.task_type}{resolver.task_id}_")
