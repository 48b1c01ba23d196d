"""The main job: python -m spinenet_tf.train --gin_file=... --model_dir=... --mode=...

    python -m spinenet_tf.train \
        --gin_file=gin_configs/experiments/retinanet_spinenet49_coco.gin \
        --gin_file=gin_configs/runtime/tpu.gin \
        --gin_param="DATA_DIR='gs://bucket/coco'" \
        --model_dir=gs://bucket/runs/49 --mode=train_and_eval --strategy=tpu --tpu=local
"""

from __future__ import annotations

import logging
import os
import shlex
import sys

from spinenet_tf import console

console.quiet_tensorflow("train")

import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from spinenet_tf.data.label_map import LabelMapError  # noqa: E402
from spinenet_tf.training import gin_bindings  # noqa: E402
from spinenet_tf.training.config import prepare_synthetic_data  # noqa: E402
from spinenet_tf.training.strategy import STRATEGIES, get_strategy  # noqa: E402
from spinenet_tf.training.trainer import Trainer  # noqa: E402

MODES = ("train", "eval", "train_and_eval", "continuous_eval")

flags.DEFINE_multi_string("gin_file", [], "Gin files, applied in order.")
flags.DEFINE_multi_string("gin_param", [], "Gin bindings applied after the files.")
flags.DEFINE_string("model_dir", None, "Checkpoints, summaries and results (local or gs://).")
flags.DEFINE_enum("mode", "train_and_eval", MODES, "What to run.")
flags.DEFINE_enum("strategy", "default", STRATEGIES, "tf.distribute strategy.")
flags.DEFINE_string("tpu", None, "TPU name or grpc:// address ('local' on a TPU VM).")
flags.DEFINE_float("eval_timeout", None, "continuous_eval: stop after this many seconds idle.")
flags.mark_flag_as_required("model_dir")
FLAGS = flags.FLAGS


def run(mode: str, model_dir: str, strategy, config) -> dict:
    """Runs one mode; returns the last evaluation metrics (or training losses)."""
    trainer = Trainer(config, model_dir, strategy)
    if trainer.chief:
        tf.io.gfile.makedirs(model_dir)
        with tf.io.gfile.GFile(os.path.join(model_dir, "config.gin"), "w") as f:
            f.write(gin_bindings.config_str())
        with tf.io.gfile.GFile(os.path.join(model_dir, "operative_config.gin"), "w") as f:
            f.write(gin_bindings.operative_config_str())
    if mode == "train":
        return trainer.train()
    if mode == "eval":
        trainer.restore()
        return trainer.evaluate()
    if mode == "continuous_eval":
        return trainer.continuous_eval(timeout=FLAGS.eval_timeout)
    # train_and_eval: evaluate at every checkpoint; a run that resumes at its last step
    # (nothing left to train) evaluates once.
    trainer.train(evaluate_every_checkpoint=True)
    return trainer.last_eval if trainer.last_eval is not None else trainer.evaluate()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    # Our progress and results at INFO; TensorFlow's own INFO chatter (checkpoint sharding,
    # tf.data buffer sizes) stays out of the console.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logger = logging.getLogger("spinenet_tf")
    logger.setLevel(logging.INFO)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    try:
        gin_bindings.parse(FLAGS.gin_file, FLAGS.gin_param)
        config = gin_bindings.experiment_config()
    except (ValueError, OSError, TypeError) as e:  # unknown bindings, missing files, bad values
        raise app.UsageError(f"gin configuration: {e}") from None
    config = prepare_synthetic_data(config)
    strategy = get_strategy(FLAGS.strategy, FLAGS.tpu)
    try:  # the trainer checks the category ids against num_classes before building
        metrics = run(FLAGS.mode, FLAGS.model_dir, strategy, config)
    except LabelMapError as e:
        raise app.UsageError(str(e)) from None
    print(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()), file=sys.stdout, flush=True)
    if FLAGS.mode in ("train", "train_and_eval"):
        print(next_steps(FLAGS.model_dir, FLAGS.gin_file, FLAGS.gin_param, config), flush=True)


def _shell_word(arg: str) -> str:
    """`arg` as a shell word that reads well: bare when safe, in double quotes when it holds
    only single quotes and spaces to protect (gin strings), else shlex's single quotes."""
    quoted = shlex.quote(arg)
    if quoted == arg or any(c in arg for c in '"$`\\!'):
        return quoted
    return f'"{arg}"'


def next_steps(model_dir: str, gin_files, gin_params, config) -> str:
    """What to run after training, for this run: export, predict, TensorBoard."""
    name = os.path.basename(os.path.normpath(model_dir)) or "model"
    # The interpreter as the user would type it: .venv/bin/python inside the project.
    python = os.path.relpath(sys.executable) if ".venv" in sys.executable else "python"
    # Shell-quoted, so that a binding holding quotes (e.g. name='adam') pastes back intact.
    model_flags = " ".join(
        [_shell_word(f"--gin_file={f}") for f in gin_files]
        + [_shell_word(f"--gin_param={p}") for p in gin_params]
    )
    if config.synthetic_data_dir:
        images = config.task.synthetic_data(
            config.synthetic_data_dir, **config.synthetic_data_args
        )["images"]
    else:
        images = "YOUR_IMAGES/*.jpg"
    predictions = os.path.join(model_dir, "predictions")
    export_dir = shlex.quote(f"exports/{name}")
    return "\n".join(
        [
            "Next:",
            f"  export:      {python} -m spinenet_tf.export {model_flags} \\",
            f"                 --checkpoint={shlex.quote(model_dir)} --export_dir={export_dir}",
            f"  predict:     {python} -m spinenet_tf.predict --saved_model={export_dir} \\",
            f"                 --images={shlex.quote(images)} "
            f"--output_dir={shlex.quote(predictions)}",
            f"  TensorBoard: tensorboard --logdir={shlex.quote(model_dir)}",
        ]
    )


if __name__ == "__main__":
    app.run(main)
