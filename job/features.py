"""Cached backbone features: the frozen phase trains its head on them instead of on images.

With the backbone frozen and no augmentation, every epoch would push the same images
through the same function. `FeatureExtractor` runs the backbone once per split (inference
only, large batches, one traced function for every split and batch size); the datasets
below then serve those features as job.data serves images: shuffled with the same seed,
buffer and count, and resumable by skipping the batches already seen.
"""

from __future__ import annotations

import tensorflow as tf

from job import data as data_lib
from job.config import DataConfig

# Feature extraction is inference only: batches of at least this many images.
EXTRACT_BATCH = 256
# Per replica, when evaluating cached features: the head is one matmul.
FEATURE_EVAL_BATCH = 1024


class FeatureExtractor:
    """Pooled backbone features of this worker's shard of a split, in float32, with their labels."""

    def __init__(self, strategy, features, preprocess):
        self.strategy, self.features, self.preprocess = strategy, features, preprocess
        self._traced = None

    def __call__(self, data: DataConfig, split: str, image_size: int, global_batch: int):
        replicas = self.strategy.num_replicas_in_sync
        # Batches larger than training's are cheap in memory here and amortise per-call
        # overhead; a multiple of the replica count so every replica gets the same share.
        batch = replicas * max(global_batch // replicas, EXTRACT_BATCH // replicas, 1)
        dataset = self.strategy.distribute_datasets_from_function(
            lambda ctx: data_lib.eval_dataset(data, split, ctx.get_per_replica_batch_size(batch), image_size, ctx))
        if self._traced is None:
            self._traced = tf.function(lambda images, labels: self.strategy.run(
                lambda x, y: (self.features(self.preprocess(x)), y), args=(images, labels)))
            # Traced once, for any batch size (the element spec's batch dimension is None):
            # every split and its partial last batch reuse it. A trace costs a second or so.
            self._traced.get_concrete_function(*dataset.element_spec)
        features, labels = [], []
        for images, batch_labels in dataset:
            f, y = self._traced(images, batch_labels)
            # Labels travel with their features, so the order across local replicas does not matter.
            features += [tf.cast(t, tf.float32) for t in self.strategy.experimental_local_results(f)]
            labels += list(self.strategy.experimental_local_results(y))
        return tf.concat(features, 0), tf.concat(labels, 0)


def train_dataset(features, labels, batch_size: int, shuffle_buffer: int, seed: int, skip_batches: int = 0):
    """Endless shuffled batches of cached (features, labels), like job.data.train_dataset's.

    Indices are shuffled, not 5 KB feature rows, and a whole batch is gathered at once. The
    same seed, buffer and count as the image pipeline give the same order as images exactly
    when the features are in image order (one replica per worker).
    """
    count = int(labels.shape[0])
    ds = tf.data.Dataset.range(count).shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.batch(batch_size, drop_remainder=True).skip(skip_batches)
    ds = ds.map(lambda index: (tf.gather(features, index), tf.gather(labels, index)),
                num_parallel_calls=data_lib.AUTOTUNE)
    return data_lib.pipeline_options(ds.prefetch(data_lib.AUTOTUNE))


def eval_dataset(features, labels):
    """One pass in large batches: evaluating cached features is a matmul per batch."""
    return tf.data.Dataset.from_tensor_slices((features, labels)).batch(FEATURE_EVAL_BATCH)
