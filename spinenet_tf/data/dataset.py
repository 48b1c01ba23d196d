"""make_dataset: sources (TFRecord patterns, TFDS) -> decoded -> parsed -> batched, per host."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import tensorflow as tf

from spinenet_tf.data.decoders import decode_example, decode_tfds

AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass(frozen=True)
class TFDSSource:
    """A TFDS dataset such as coco/2017 (see `decode_tfds` for its class numbering)."""

    name: str = "coco/2017"
    split: str = "train"
    data_dir: str | None = None


def _placeholder(spec):
    """A zero-sized element of the given structure, to stand in for an undecodable record."""
    return tf.nest.map_structure(
        lambda s: tf.zeros([0 if d is None else d for d in s.shape], s.dtype), spec
    )


def _tfrecord_elements(
    patterns, input_context, training, seed, cycle_length, deterministic, skip_corrupt, counter
):
    """(decoded dict, ok, shard, record index) per record; ok is False for a bad record."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    files = sorted({f for p in patterns for f in tf.io.gfile.glob(p)})
    if not files:
        raise FileNotFoundError(f"no files match {patterns}")
    shard_records = False
    sizes = [tf.io.gfile.stat(f).length for f in files]
    files_ds = tf.data.Dataset.from_tensor_slices((files, tf.constant(sizes, tf.int64)))
    if input_context and input_context.num_input_pipelines > 1:
        if len(files) >= input_context.num_input_pipelines:
            files_ds = files_ds.shard(
                input_context.num_input_pipelines, input_context.input_pipeline_id
            )
        else:  # fewer files than hosts: every host reads all and keeps its share of records
            shard_records = True
    if training:
        files_ds = files_ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)

    def read(shard, size):
        # A broken frame (bad length or CRC) ends TFRecordDataset's reading of a shard with an
        # error that names only a byte offset. So read past errors and, after the last record,
        # compare the bytes read with the file size: a short read names the shard.
        records = tf.data.TFRecordDataset(shard).ignore_errors().enumerate()
        records = records.map(lambda i, r: (r, i, True))
        records = records.concatenate(
            tf.data.Dataset.from_tensors(("", tf.constant(-1, tf.int64), False))
        )

        def account(state, element):
            record, index, is_record = element
            # A TFRecord frame is 8 length bytes, 4 CRC bytes, the data, 4 CRC bytes.
            frame = tf.cast(tf.strings.length(record), tf.int64) + 16
            state = state + tf.cast(is_record, tf.int64) * tf.stack([frame, 1])
            return state, (record, index, is_record, state)

        records = records.scan(tf.zeros([2], tf.int64), account)
        return records.filter(
            lambda record, index, is_record, state: tf.cond(
                is_record,
                lambda: True,
                lambda: _check_shard(shard, size, state, skip_corrupt, counter),
            )
        ).map(lambda record, index, is_record, state: (record, shard, index))

    records = files_ds.interleave(
        read,
        cycle_length=min(cycle_length, len(files)),
        num_parallel_calls=AUTOTUNE,
        deterministic=deterministic,
    )
    if shard_records:
        records = records.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    return records


def _guarded(decode: Callable, example_spec):
    good = tf.data.Dataset.from_tensors(example_spec).map(decode)
    placeholder = _placeholder(good.element_spec)

    def fn(record, shard, index):
        decoded = tf.data.Dataset.from_tensors(record).map(decode).ignore_errors()
        first = decoded.map(lambda d: (d, True)).concatenate(
            tf.data.Dataset.from_tensors((placeholder, False))
        )
        return first.take(1).map(lambda d, ok: (d, ok, shard, index))

    return fn


def make_dataset(
    source,
    parser: Callable,
    global_batch_size: int,
    *,
    training: bool,
    input_context: tf.distribute.InputContext | None = None,
    include_masks: bool = False,
    shuffle_buffer: int = 1024,
    cycle_length: int = 16,
    deterministic: bool = False,
    seed: int | None = None,
    skip_corrupt: bool = False,
    skipped_counter: tf.Variable | None = None,
    cache: bool = False,
) -> tf.data.Dataset:
    """A batched dataset of parser outputs for one host.

    Args:
        source: a TFRecord file pattern (local or gs://) or list of them, or a TFDSSource.
        parser: parse(decoded, seed) -> (image, labels), e.g. `detection_parser(...)`.
        global_batch_size: split across replicas through input_context.
        training: shuffle, repeat forever, drop the last partial batch. Otherwise one pass,
            with the last batch filled up with copies whose source_id is -1 (to skip in
            evaluation), so every batch has the same static shape.
        input_context: from `strategy.distribute_datasets_from_function`; shards files (or,
            with fewer files than hosts, records) across input pipelines.
        deterministic: fixed order and augmentation given `seed` (for tests and debugging).
        skip_corrupt: skip records that fail to parse or decode, printing the shard and record
            index of each and counting them in skipped_counter; by default such a record stops
            the pipeline with an error naming its shard and record index.
        cache: cache decoded examples in memory (small datasets such as the shapes data).
    """
    batch_size = (
        input_context.get_per_replica_batch_size(global_batch_size)
        if input_context
        else global_batch_size
    )
    if seed is None and deterministic:
        seed = 0
    if isinstance(source, TFDSSource):
        elements = _tfds_elements(source, input_context, training)
    else:
        elements = _tfrecord_elements(
            source,
            input_context,
            training,
            seed,
            cycle_length,
            deterministic,
            skip_corrupt,
            skipped_counter,
        )
        decode = _guarded(lambda r: decode_example(r, include_masks), tf.constant("", tf.string))
        elements = elements.interleave(
            decode, cycle_length=16, num_parallel_calls=AUTOTUNE, deterministic=deterministic
        )
        elements = elements.filter(_check_record(skip_corrupt, skipped_counter))
        elements = elements.map(lambda d, ok, shard, index: d)
    if cache:
        elements = elements.cache()
    if training:
        elements = elements.repeat()
        if shuffle_buffer:
            elements = elements.shuffle(shuffle_buffer, seed=seed)
    seeds = tf.data.Dataset.random(seed=seed).batch(2)
    ds = tf.data.Dataset.zip(elements, seeds).map(
        parser, num_parallel_calls=AUTOTUNE, deterministic=deterministic
    )
    if not training:
        filler = ds.take(1).map(_mark_filler).repeat(batch_size - 1)
        ds = ds.concatenate(filler)
    ds = ds.batch(batch_size, drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = deterministic
    options.experimental_optimization.map_parallelization = True
    return ds.with_options(options).prefetch(AUTOTUNE)


def _mark_filler(image, labels):
    labels = dict(labels)
    labels["source_id"] = tf.constant(-1, tf.int64)
    return image, labels


def _check_record(skip_corrupt: bool, counter: tf.Variable | None):
    def check(d, ok, shard, index):
        message = tf.strings.format(
            "corrupt record {} in shard {}: it cannot be parsed as a tf.Example or its image "
            "cannot be decoded",
            (index, shard),
        )
        if not skip_corrupt:
            with tf.control_dependencies([tf.debugging.Assert(ok, [message], summarize=1)]):
                return tf.identity(ok)
        if counter is not None:
            counter.assign_add(tf.cast(tf.logical_not(ok), counter.dtype))
        return tf.cond(ok, lambda: True, lambda: _warn(message))

    return check


def _check_shard(shard, size, state, skip_corrupt, counter):
    """False, after checking that the whole shard was read (see `read`)."""
    consumed, count = tf.unstack(state)
    message = tf.strings.format(
        "shard {} is corrupt after record {}: its records end at byte {} of {} (a broken "
        "length or CRC)",
        (shard, count - 1, consumed, size),
    )
    if not skip_corrupt:
        with tf.control_dependencies([tf.debugging.Assert(consumed == size, [message])]):
            return tf.constant(False)
    if counter is not None:
        counter.assign_add(tf.cast(consumed != size, counter.dtype))
    return tf.cond(consumed == size, lambda: False, lambda: _warn(message))


def _warn(message) -> bool:
    with tf.control_dependencies([tf.print("WARNING: skipping", message)]):
        return tf.constant(False)


def _tfds_elements(source: TFDSSource, input_context, training: bool) -> tf.data.Dataset:
    import tensorflow_datasets as tfds

    ds = tfds.load(
        source.name,
        split=source.split,
        data_dir=source.data_dir,
        shuffle_files=training,
        read_config=tfds.ReadConfig(input_context=input_context),
        download=False,
    )
    return ds.map(decode_tfds, num_parallel_calls=AUTOTUNE)
