"""Model weights in training checkpoints: by variable path, so that any model holding the
same layers (a RetinaNet, a classifier: the backbone's paths are the same) can read them.

- `restore_model`: all of a model's weights from a checkpoint of the same model (export,
  predict).
- `init_from_checkpoint`: a new experiment's start from another's checkpoint (a classifier's
  backbone for a detector; a converted Model Garden detector for fine-tuning with other
  classes): what fits is loaded, the rest stays fresh, and the report says which.
"""

from __future__ import annotations

import dataclasses
import gc

import tensorflow as tf

INIT_SCOPES = ("all", "backbone")
_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"


def by_path(variables, key=lambda path: path) -> dict:
    out = {}
    for v in variables:
        k = key(v.path)
        if k in out:
            raise ValueError(f"two variables share the path {k}; cannot checkpoint by path")
        out[k] = v
    return out


def model_variables(model) -> dict:
    """The model's part of a training checkpoint: its variables keyed by path."""
    return by_path(model.weights)


def checkpoint_prefix(checkpoint: str) -> str:
    """The prefix of a checkpoint given as a prefix (model_dir/ckpt-1500) or a directory (its
    latest checkpoint); ValueError naming the path when there is none."""
    if tf.io.gfile.isdir(checkpoint):
        prefix = tf.train.latest_checkpoint(checkpoint)
        if prefix is None:
            raise ValueError(f"no checkpoint in directory {checkpoint}")
        return prefix
    if not tf.io.gfile.exists(checkpoint + ".index"):
        raise ValueError(f"no checkpoint at {checkpoint} (expected {checkpoint}.index)")
    return checkpoint


def restore_model(model, checkpoint: str) -> str:
    """Loads a training checkpoint's model weights (not its optimizer state) into `model`.

    `checkpoint` is a checkpoint prefix (model_dir/ckpt-1500) or a directory, whose latest
    checkpoint is taken. Returns the prefix read. Raises ValueError naming the path when
    there is no checkpoint or when it lacks one of the model's variables.
    """
    prefix = checkpoint_prefix(checkpoint)
    # TF logs every unmatched checkpoint value when a failed restore is garbage-collected;
    # the error below says what matters, so that stays quiet.
    logger, level = tf.get_logger(), tf.get_logger().level
    logger.setLevel("ERROR")
    error = None
    try:
        checkpoint_object = tf.train.Checkpoint(model=model_variables(model))
        # expect_partial: the optimizer's slots are not wanted here.
        checkpoint_object.restore(prefix).expect_partial().assert_existing_objects_matched()
    except (AssertionError, ValueError) as e:  # missing variables / shape mismatches
        error = str(e)[:500]
    finally:
        checkpoint_object = None
        gc.collect()
        logger.setLevel(level)
    if error:
        raise ValueError(
            f"checkpoint {prefix} does not fit this model (another model_id, size or "
            f"overrides?): {error}"
        )
    return prefix


def _key(path: str) -> str:
    # tf.train.Checkpoint escapes a dict key's "." as ".." and "/" as ".S".
    return "model/" + path.replace(".", "..").replace("/", ".S") + _SUFFIX


def _path(key: str) -> str | None:
    if not (key.startswith("model/") and key.endswith(_SUFFIX)):
        return None
    name = key[len("model/") : -len(_SUFFIX)]
    if "/" in name:  # a nested object (not one of a model's variables)
        return None
    out, i = [], 0
    while i < len(name):
        pair = name[i : i + 2]
        if pair == "..":
            out.append(".")
            i += 2
        elif pair == ".S":
            out.append("/")
            i += 2
        else:
            out.append(name[i])
            i += 1
    return "".join(out)


@dataclasses.dataclass
class InitReport:
    """What `init_from_checkpoint` did: variable paths loaded, and those left fresh with why."""

    checkpoint: str
    loaded: list
    fresh: dict  # path -> reason

    def summary(self, limit: int = 8) -> str:
        lines = [
            f"init_checkpoint {self.checkpoint}: loaded {len(self.loaded)} variables, "
            f"left {len(self.fresh)} fresh"
        ]
        groups: dict = {}
        for path, reason in self.fresh.items():
            groups.setdefault(reason.split(":")[0], []).append((path, reason))
        for items in groups.values():
            for path, reason in items[:limit]:
                lines.append(f"  fresh: {path} ({reason})")
            if len(items) > limit:
                lines.append(f"  ... and {len(items) - limit} more like it")
        return "\n".join(lines)


def _backbone_paths(model) -> set:
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        return {v.path for v in model.weights}
    return {v.path for v in backbone.weights}


def init_from_checkpoint(model, checkpoint: str, scope: str = "all") -> InitReport:
    """Initialises `model` from another experiment's checkpoint (prefix or directory):
    a training checkpoint of spinenet_tf, or a converted Model Garden one
    (`python -m spinenet_tf.convert ... --output=DIR/ckpt`).

    The backbone must match exactly (the same variables, the same shapes: the same model
    id and backbone settings); otherwise ValueError says what differs. scope 'all' then
    loads every other variable whose path and shape match (a detector's head; a class output
    for other classes stays fresh), 'backbone' the backbone only. Optimizer state is never
    read. Returns an `InitReport`.
    """
    if scope not in INIT_SCOPES:
        raise ValueError(f"init scope {scope!r} must be one of {INIT_SCOPES}")
    prefix = checkpoint_prefix(checkpoint)
    reader = tf.train.load_checkpoint(prefix)
    shapes = {}
    for key, shape in reader.get_variable_to_shape_map().items():
        path = _path(key)
        if path is not None:
            shapes[path] = tuple(shape)
    ours = model_variables(model)
    backbone = _backbone_paths(model)
    problems = {
        "missing": [p for p in sorted(backbone) if p not in shapes],
        "with another shape": [
            f"{p} {tuple(ours[p].shape)} vs {shapes[p]}"
            for p in sorted(backbone)
            if p in shapes and tuple(ours[p].shape) != shapes[p]
        ],
    }
    # Paths of the checkpoint's backbone: those outside its head (every spinenet_tf model
    # names its head layer "head").
    theirs = {p for p in shapes if not p.startswith("head/")}
    problems["only in the checkpoint"] = sorted(theirs - set(ours) - backbone)
    if not shapes:
        raise ValueError(f"checkpoint {prefix} holds no model variables of spinenet_tf")
    if any(problems.values()):
        detail = "; ".join(f"{len(v)} {k} (e.g. {v[0]})" for k, v in problems.items() if v)
        raise ValueError(
            f"checkpoint {prefix} does not hold this model's backbone ({len(backbone)} "
            f"variables): {detail}. Is it of another model_id or backbone setting?"
        )
    loaded, fresh = [], {}
    for path, variable in ours.items():
        if scope == "backbone" and path not in backbone:
            fresh[path] = "not in the backbone: init scope 'backbone'"
        elif path not in shapes:
            fresh[path] = "not in the checkpoint"
        elif tuple(variable.shape) != shapes[path]:
            fresh[path] = f"shape: ours {tuple(variable.shape)}, checkpoint's {shapes[path]}"
        else:
            variable.assign(tf.cast(reader.get_tensor(_key(path)), variable.dtype))
            loaded.append(path)
    return InitReport(prefix, loaded, fresh)
