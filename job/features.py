"""Cached backbone outputs: later phases train on them instead of on images.

With the backbone frozen and no augmentation, every epoch would push the same images through
the same function. `Extractor` runs a frozen function once per split (inference only, large
batches, one traced function for every split and batch size):
  - the whole backbone's pooled features, for the head phase (train.cache_features);
  - the frozen bottom's activations below the fine-tuned top (train.finetune.cache_frozen),
    from which the head phase's features are then computed too.
A phase that flips its images trains on the cached outputs of mirrored images where the image
pipeline would have flipped (the same seeds), so caching changes where work runs, not the
numbers. The datasets below serve the cached outputs as job.data serves images: shuffled with
the same seed, buffer and count, resumable by skipping the batches already seen.
"""

from __future__ import annotations

from typing import Callable, Optional

import tensorflow as tf

from job import data as data_lib
from job.config import DataConfig

# Extraction is inference only: batches of at least this many images.
EXTRACT_BATCH = 256
# Per replica, when evaluating cached features: the head is one matmul.
FEATURE_EVAL_BATCH = 1024


class Extractor:
    """compute(preprocess(images)) over this worker's shard of a split (of its `first` examples,
    if given), in float32, with the labels."""

    def __init__(self, strategy, compute: Callable, preprocess: Callable, max_batch: int = EXTRACT_BATCH):
        # max_batch: what the memory limit allows (job.caches.inference_batch), at most EXTRACT_BATCH.
        self.strategy, self.compute, self.preprocess = strategy, compute, preprocess
        self.max_batch = max(min(max_batch, EXTRACT_BATCH), 1)
        self._traced = {}

    def __call__(self, data: DataConfig, split: str, image_size: int, global_batch: int, mirrored: bool = False,
                 first: Optional[int] = None):
        replicas = self.strategy.num_replicas_in_sync
        # Batches larger than training's are cheap in memory here and amortise per-call
        # overhead; a multiple of the replica count so every replica gets the same share.
        batch = replicas * max(min(max(global_batch, EXTRACT_BATCH), self.max_batch) // replicas, 1)
        dataset = self.strategy.distribute_datasets_from_function(
            lambda ctx: data_lib.eval_dataset(data, split, ctx.get_per_replica_batch_size(batch), image_size, ctx, first))
        step = self._traced.get(mirrored)
        if step is None:
            def replica_step(images, labels):
                return self.compute(self.preprocess(tf.reverse(images, axis=[2]) if mirrored else images)), labels

            step = tf.function(lambda images, labels: self.strategy.run(replica_step, args=(images, labels)))
            # Traced once, for any batch size (the element spec's batch dimension is None):
            # every split and its partial last batch reuse it. A trace costs a second or so.
            step.get_concrete_function(*dataset.element_spec)
            self._traced[mirrored] = step
        outputs, labels = [], []
        for images, batch_labels in dataset:
            f, y = step(images, batch_labels)
            # Labels travel with their outputs, so the order across local replicas does not matter.
            outputs += [tf.cast(t, tf.float32) for t in self.strategy.experimental_local_results(f)]
            labels += list(self.strategy.experimental_local_results(y))
        return tf.concat(outputs, 0), tf.concat(labels, 0)


def in_batches(compute: Callable, inputs, batch: int = EXTRACT_BATCH):
    """compute() over `inputs` in batches (inference on cached tensors of this worker)."""
    return tf.concat([compute(inputs[i:i + batch]) for i in range(0, int(inputs.shape[0]), batch)], 0)


def train_dataset(inputs, labels, batch_size: int, shuffle_buffer: int, seed: int, skip_batches: int = 0,
                  mirrored: Optional[tf.Tensor] = None):
    """Endless shuffled batches of cached (inputs, labels), like job.data.train_dataset's.

    Indices are shuffled, not rows of kilobytes, and a whole batch is gathered at once. The
    same seed, buffer and count as the image pipeline give the same order as images exactly
    when the inputs are in image order (one replica per worker). With `mirrored` (the cached
    outputs of mirrored images), the images job.data.augment would flip take those.
    """
    count = int(labels.shape[0])

    def gather(index, batch_index):
        batch = tf.gather(inputs, index)
        if mirrored is not None:
            mask = data_lib.flip_mask(tf.shape(index)[0], tf.stack([tf.cast(seed, tf.int64), batch_index]))
            batch = tf.where(tf.reshape(mask, [-1] + [1] * (batch.shape.rank - 1)), tf.gather(mirrored, index), batch)
        return batch, tf.gather(labels, index)

    ds = tf.data.Dataset.range(count).shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    ds = tf.data.Dataset.zip((ds.batch(batch_size, drop_remainder=True).skip(skip_batches),
                              tf.data.Dataset.counter(start=skip_batches)))
    return data_lib.pipeline_options(ds.map(gather, num_parallel_calls=data_lib.AUTOTUNE).prefetch(data_lib.AUTOTUNE))


def eval_dataset(inputs, labels, batch_size: int = FEATURE_EVAL_BATCH):
    """One pass over cached inputs (a (plain, mirrored) pair for flip test-time augmentation)."""
    return tf.data.Dataset.from_tensor_slices((inputs, labels)).batch(batch_size)
