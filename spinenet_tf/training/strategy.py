"""tf.distribute strategy resolution for default, mirrored, multi-worker and TPU runs."""

from __future__ import annotations

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


def get_strategy(name: str = "default", tpu: str | None = None) -> tf.distribute.Strategy:
    """Builds the strategy; for 'tpu', `tpu` is the TPU name, a grpc:// address, or '' / 'local'
    for a TPU VM's own chips."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        # Reads TF_CONFIG; collective ops over gRPC between the workers.
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
            tpu="local" if tpu in (None, "", "local") else tpu
        )
        if tpu not in (None, "", "local"):
            tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"unknown strategy '{name}'; expected one of {', '.join(STRATEGIES)}")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this worker writes checkpoints, summaries and results."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type is None or (task_type in ("chief", "worker") and task_id == 0)
