"""make_dataset: sources (TFRecord patterns, TFDS) -> decoded -> parsed -> batched, per host."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from spinenet_tf.data.decoders import Decoders, detection_decoders

AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass(frozen=True)
class TFDSSource:
    """A TFDS dataset such as coco/2017 (see `decode_tfds` for its class numbering)."""

    name: str = "coco/2017"
    split: str = "train"
    data_dir: str | None = None


def data_source(text: str):
    """DataConfig.source as make_dataset takes it: 'tfds:NAME:SPLIT' -> TFDSSource, else the
    TFRecord pattern itself."""
    if text.startswith("tfds:"):
        _, name, split = text.split(":", 2)
        return TFDSSource(name, split)
    if not text:
        raise ValueError("no data source given; set DataConfig.source")
    return text


def _placeholder(spec):
    """A zero-sized element of the given structure, to stand in for an undecodable record."""
    return tf.nest.map_structure(
        lambda s: tf.zeros([0 if d is None else d for d in s.shape], s.dtype), spec
    )


@dataclasses.dataclass
class _TFRecordReader:
    """Decoded, checked records of TFRecord shards, each keyed by (file index, record index).

    Bad records are found without a per-record guard: each shard is decoded in order
    (parallel, deterministic), ignore_errors drops what fails, and a scan spots the gap in
    record indices. A broken frame (bad length or CRC) ends TFRecordDataset's reading of a
    shard; the bytes read then fall short of the file size, checked at the end.
    """

    decode: Callable
    skip_corrupt: bool
    counter: tf.Variable | None
    # With fewer files than input pipelines, every pipeline reads every file and decodes
    # the records whose index is pipeline_id modulo pipelines.
    pipelines: int = 1
    pipeline_id: int = 0

    def __post_init__(self):
        spec = tf.data.Dataset.from_tensors("").map(self.decode).element_spec
        self.placeholder = _placeholder(spec)

    def __call__(self, shard, size, file_id) -> tf.data.Dataset:
        """(decoded record, key [2]) for the records of one shard that this pipeline owns."""
        checked = self._in_order(shard).scan(tf.zeros([2], tf.int64), self._gaps)
        checked = checked.filter(
            lambda d, mine, end, first_missing, missing, consumed, index: (
                _check(
                    shard,
                    size,
                    end,
                    first_missing,
                    missing,
                    consumed,
                    self.skip_corrupt,
                    self.counter,
                )
                & mine
                & ~end
            )
        )
        # Each record keeps its key (file, record index): its augmentation seed comes from it.
        return checked.map(lambda d, *rest: (d, tf.stack([file_id, rest[-1]])))

    def _in_order(self, shard) -> tf.data.Dataset:
        """(decoded or placeholder, record index, bytes consumed, mine) for the records that
        decode, then an end marker with index -1."""

        def account(consumed, record):
            consumed += tf.cast(tf.strings.length(record), tf.int64) + 16
            return consumed, (record, consumed)

        def decode_mine(index, element):
            record, consumed = element
            mine = index % self.pipelines == self.pipeline_id
            d = tf.cond(mine, lambda: self.decode(record), lambda: self.placeholder)
            return d, index, consumed, mine

        raw = tf.data.TFRecordDataset(shard).ignore_errors()
        raw = raw.scan(tf.constant(0, tf.int64), account).enumerate()
        decoded = raw.map(decode_mine, num_parallel_calls=AUTOTUNE, deterministic=True)
        end = (self.placeholder, tf.constant(-1, tf.int64), tf.constant(-1, tf.int64), False)
        return decoded.ignore_errors().concatenate(tf.data.Dataset.from_tensors(end))

    @staticmethod
    def _gaps(state, element):
        """Scan state [next expected index, bytes consumed]; emits what `_check` needs."""
        d, index, consumed, mine = element
        end = index < 0
        missing = tf.where(end, tf.constant(0, tf.int64), index - state[0])
        new_state = tf.where(end, state, tf.stack([index + 1, consumed]))
        return new_state, (d, mine, end, state[0], missing, state[1], index)


def _tfrecord_elements(
    patterns,
    reader: _TFRecordReader,
    input_context,
    training: bool,
    seed,
    cycle_length: int,
    deterministic: bool,
) -> tf.data.Dataset:
    """The records of the matching files that `reader` decodes, for this input pipeline."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    files = sorted({f for p in patterns for f in tf.io.gfile.glob(p)})
    if not files:
        raise FileNotFoundError(f"no files match {patterns}")
    files_ds = tf.data.Dataset.from_tensor_slices(
        (
            files,
            tf.constant([tf.io.gfile.stat(f).length for f in files], tf.int64),
            tf.range(len(files), dtype=tf.int64),
        )
    )
    if input_context and input_context.num_input_pipelines > 1:
        if len(files) >= input_context.num_input_pipelines:
            files_ds = files_ds.shard(
                input_context.num_input_pipelines, input_context.input_pipeline_id
            )
        else:  # fewer files than hosts: every host reads all and decodes its share of records
            reader.pipelines = input_context.num_input_pipelines
            reader.pipeline_id = input_context.input_pipeline_id
    if training:
        files_ds = files_ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    return files_ds.interleave(
        reader,
        cycle_length=min(cycle_length, len(files)),
        num_parallel_calls=AUTOTUNE,
        deterministic=deterministic,
    )


def _check(shard, size, end, first_missing, missing, consumed, skip_corrupt, counter):
    """True unless a bad record precedes this element or the shard ends short; then an error
    naming shard and record, or (skip_corrupt) a printed warning and a count."""
    bad_record = missing > 0
    short = end & (consumed != size)
    message = tf.cond(
        short,
        lambda: tf.strings.format(
            "shard {} is corrupt after record {}: its readable records end at byte {} of {} "
            "(a broken length or CRC, or undecodable last records)",
            (shard, first_missing - 1, consumed, size),
        ),
        lambda: tf.strings.format(
            "corrupt record {} in shard {} ({} in a row): it cannot be parsed as a tf.Example "
            "or its image cannot be decoded",
            (first_missing, shard, missing),
        ),
    )
    ok = ~(bad_record | short)
    if not skip_corrupt:
        with tf.control_dependencies([tf.debugging.Assert(ok, [message], summarize=1)]):
            return tf.identity(ok)
    if counter is not None:
        counter.assign_add(tf.cast(missing, counter.dtype) + tf.cast(short, counter.dtype))
    # The element itself is good (the bad records are already dropped): keep it.
    with tf.control_dependencies([tf.cond(ok, tf.no_op, lambda: _warn(message))]):
        return tf.constant(True)


def make_dataset(
    source,
    parser: Callable,
    global_batch_size: int,
    *,
    training: bool,
    input_context: tf.distribute.InputContext | None = None,
    decoders: Decoders | None = None,
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
        decoders: how records become the parser's dicts (`spinenet_tf.data.decoders`);
            default: detection without masks.
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
    decoders = decoders or detection_decoders()
    if isinstance(source, TFDSSource):
        elements = _tfds_elements(source, decoders.tfds, input_context, training)
    else:
        reader = _TFRecordReader(decoders.example, skip_corrupt, skipped_counter)
        elements = _tfrecord_elements(
            source, reader, input_context, training, seed, cycle_length, deterministic
        )
    if cache:
        elements = elements.cache()
    elements = _passes(elements, training, shuffle_buffer, seed)
    base = np.random.SeedSequence(seed).generate_state(1, np.uint64)[0] >> np.uint64(1)
    ds = elements.map(
        lambda d, key, epoch: parser(d, _element_seed(int(base), epoch, key)),
        num_parallel_calls=AUTOTUNE,
        deterministic=deterministic,
    )
    if not training:
        filler = ds.take(1).map(_mark_filler).repeat(batch_size - 1)
        ds = ds.concatenate(filler)
    ds = ds.batch(batch_size, drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = deterministic
    options.experimental_optimization.map_parallelization = True
    return ds.with_options(options).prefetch(AUTOTUNE)


def _passes(elements, training: bool, shuffle_buffer: int, seed) -> tf.data.Dataset:
    """(d, key) -> (d, key, pass number). Training repeats forever, numbering the passes, and
    shuffles: a record's augmentation seed depends on (seed, pass, its key), not on where it
    falls in this pipeline's stream, so one pipeline or several (a worker each, sharing
    records) augment every record alike."""
    if not training:
        return elements.map(lambda d, key: (d, key, tf.constant(0, tf.int64)))
    repeated = tf.data.Dataset.range(2**62).flat_map(
        lambda epoch: elements.map(lambda d, key: (d, key, epoch))
    )
    return repeated.shuffle(shuffle_buffer, seed=seed) if shuffle_buffer else repeated


def _element_seed(base: int, epoch, key):
    """A stateless seed [2] from the run's base seed, the pass and an element's key."""
    seed = tf.stack([tf.constant(base, tf.int64), epoch])
    for i in range(key.shape[0]):
        seed = tf.random.experimental.stateless_fold_in(seed, key[i])
    return seed


def _mark_filler(image, labels):
    labels = dict(labels)
    labels["source_id"] = tf.constant(-1, tf.int64)
    return image, labels


def _warn(message):
    return tf.print("WARNING: skipping", message, output_stream=sys.stderr)


def _tfds_elements(
    source: TFDSSource, decode: Callable, input_context, training: bool
) -> tf.data.Dataset:
    import tensorflow_datasets as tfds

    ds = tfds.load(
        source.name,
        split=source.split,
        data_dir=source.data_dir,
        shuffle_files=training,
        read_config=tfds.ReadConfig(input_context=input_context),
        download=False,
    )
    # The key of an example is its position in this pipeline's split (TFDS gives no record
    # index without tfds_id, which mock data lacks).
    ds = ds.map(decode, num_parallel_calls=AUTOTUNE).enumerate()
    return ds.map(lambda index, d: (d, index[None]))
