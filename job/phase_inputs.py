"""What each phase trains and validates on, and the caches behind it.

A phase trains on images (job.data), on cached backbone features (the head, when its images
are not augmented: train.cache_features) or on cached activations of the frozen bottom (the
fine-tuned top: train.finetune.cache_frozen). `PhaseInputs` decides which, once per run, from
the settings and from what fits in this worker's share of the memory limit (job.caches), and
builds each phase's distributed (train, validation) datasets from a given step on.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import numpy as np
import tensorflow as tf

from job import caches
from job import data as data_lib
from job import features as features_lib
from job.config import Config, ConfigError
from job.distribute import input_context
from job.sources import DatasetInfo
from job.step import Phase

log = logging.getLogger(__name__)


def subset_examples(count: int, subset: float) -> int:
    """How many of `count` examples a phase with this subset setting trains on: its first ones."""
    return count if subset == 1 else max(1, int(count * subset))


def workers_on_node() -> int:
    """Training processes on this node, which share its memory: Ray Train's local world size, else 1."""
    import sys

    if "ray.train" not in sys.modules:  # not a Ray worker: no need to import Ray
        return 1
    try:
        import ray.train

        return max(1, ray.train.get_context().get_local_world_size())
    except Exception:  # noqa: BLE001 - outside a Ray Train worker the context has no world
        return 1


class PhaseInputs:
    """The data of each phase of a run: which inputs, their caches (placed against this worker's
    memory budget, one log line: `statement`), and their distributed datasets."""

    def __init__(self, config: Config, strategy, info: DatasetInfo, phases: list, model, global_batch: int,
                 preprocess):
        self.config, self.strategy, self.info, self.model = config, strategy, info, model
        self.global_batch, self.preprocess = global_batch, preprocess
        data = config.data
        self.features_fit = True
        # What this worker caches, and where: against its share of the container's memory limit.
        self.pipelines = input_context(self.strategy).num_input_pipelines
        self.cache_budget = caches.CacheBudget(data.memory_share, workers_on_node())
        self.data = caches.image_cache(data, self.info, [data.train_split, data.val_split], config.model.image_size,
                                       self.cache_budget, self.pipelines)

        # Extraction batches as large as the memory limit allows (at most features_lib.EXTRACT_BATCH).
        per_image = caches.activation_bytes_per_image(self.model.backbone)
        self.extract_batch = caches.inference_batch(self.cache_budget, data.memory_share, workers_on_node(), per_image,
                                                    features_lib.EXTRACT_BATCH)
        if self.extract_batch < features_lib.EXTRACT_BATCH:
            self.cache_budget.placed.append(f"extraction batch {self.extract_batch} (not {features_lib.EXTRACT_BATCH}: "
                                            f"{per_image / 2**20:.1f} MB of activations per image)")
        self._extract_features = features_lib.Extractor(self.strategy, self.model.features, self.preprocess,
                                                        self.extract_batch)
        # The frozen bottom of the fine-tune phase, when its activations are cached: it also
        # feeds the head phase, whose features are then the top's on those activations.
        self.split, self._cache = None, {}
        finetune = phases[1]
        if finetune.config.cache_frozen and finetune.steps > 0:
            try:
                self.split = self.model.split(finetune.config.unfreeze)
            except ValueError as err:
                raise ConfigError(f"train.finetune.unfreeze={finetune.config.unfreeze!r} with cache_frozen: {err}") from None
            self._extract_bottom = features_lib.Extractor(self.strategy, self.split.bottom, self.preprocess,
                                                          self.extract_batch)
            if not self._fits("activations of the frozen bottom", int(np.prod(self.split.shape)) * 4,
                              finetune.config.subset, self.augment(finetune) == "flip", "fine-tune on images"):
                self.split = None
        if self.split is not None:
            # Traced once for any batch size: inference on this worker's cached activations.
            self._top_features = tf.function(self.split.top_features,
                                             input_signature=[tf.TensorSpec([None, *self.split.shape], tf.float32)])
        head = phases[0]
        self.features_fit = not (self.use_feature_cache(head) and head.steps > 0) or self._fits(
            "backbone features", int(self.model.head.input_shape[-1]) * 4, head.config.subset,
            self.augment(head) == "flip", "head on images")


    def _fits(self, what: str, bytes_per_image: int, subset: float, mirrored: bool, instead: str) -> bool:
        """Whether a per-image cache of this worker (train share, val, mirror images) fits its
        memory budget; takes it from the budget if so, else records where the phase goes instead."""
        d = self.config.data
        train = self._first_examples(d.train_split, subset) or self.info.split_sizes[d.train_split]
        val = self.info.split_sizes.get(d.val_split, 0) if d.val_split else 0
        images = train * (2 if mirrored else 1) + val * (2 if self.config.model.flip_tta else 1)
        nbytes = images * bytes_per_image // self.pipelines
        if self.cache_budget.fits(nbytes):
            self.cache_budget.take(what, nbytes)
            return True
        self.cache_budget.refuse(what, nbytes, instead)
        return False

    def augment(self, phase: Phase) -> str:
        """The phase's augmentation, "auto" resolved: flips for images no larger than the model
        input (CIFAR-10), random resized crops and flips for larger ones."""
        return data_lib.resolve_augment(self.config.augment_for(phase.name), self.info.image_shape,
                                        self.config.model.image_size)

    def statement(self) -> str:
        """Each cache of this worker, its size and where it went (memory, disk, not cached), for the log."""
        return self.cache_budget.statement()

    def use_feature_cache(self, phase: Phase) -> bool:
        setting = self.config.train.cache_features
        return (phase.name == "head" and self.features_fit
                and (setting is True or (setting == "auto" and self.augment(phase) == "none")))

    def use_frozen_cache(self, phase: Phase) -> bool:
        """Fine-tune the top on cached activations of the frozen bottom (train.finetune.cache_frozen)."""
        return phase.name == "finetune" and self.split is not None

    def distribute(self, make_dataset):
        """make_dataset(per_replica_batch, input_context) -> tf.data.Dataset, per input pipeline."""
        return self.strategy.distribute_datasets_from_function(
            lambda ctx: make_dataset(ctx.get_per_replica_batch_size(self.global_batch), ctx))

    @staticmethod
    def _skip_batches(phase_step: int, ctx: tf.distribute.InputContext) -> int:
        # Each input pipeline hands one per-replica batch to each of its local replicas per step.
        return phase_step * (ctx.num_replicas_in_sync // ctx.num_input_pipelines)

    def datasets(self, phase: Phase, phase_step: int):
        """(train, val) distributed datasets of `phase` from `phase_step` on: cached features,
        cached activations of the frozen bottom, or images."""
        d, m, seed = self.data, self.config.model, self.config.train.seed
        if self.use_feature_cache(phase):
            # Evaluating cached features is a matmul: one large batch per replica, not many small ones.
            return self._cached_datasets(self._features, phase, phase_step, features_lib.FEATURE_EVAL_BATCH)
        if self.use_frozen_cache(phase):
            return self._cached_datasets(self._activations, phase, phase_step, features_lib.EXTRACT_BATCH)
        augment, first = self.augment(phase), self._first_examples(d.train_split, phase.config.subset)
        train_data = self.distribute(lambda b, ctx: data_lib.train_dataset(
            d, d.train_split, b, m.image_size, seed, self._skip_batches(phase_step, ctx), ctx, augment, first))
        val_data = self.distribute(
            lambda b, ctx: data_lib.eval_dataset(d, d.val_split, b, m.image_size, ctx)) if d.val_split else None
        return train_data, val_data

    def _first_examples(self, split: str, subset: float) -> Optional[int]:
        """A `subset` share of `split` as a count of its first examples; None: all of it."""
        return None if subset == 1 else subset_examples(self.info.split_sizes[split], subset)

    # --- cached outputs of the frozen parts --------------------------------------------
    def _activations(self, split: str, mirrored: bool = False, subset: float = 1.0):
        """Activations of the frozen bottom at the fine-tune cut for this worker's shard (its
        first `subset` share), computed once for the whole shard."""
        key = (split, mirrored)
        if key not in self._cache:
            started = time.perf_counter()
            self._cache[key] = self._extract_bottom(self.data, split, self.config.model.image_size, self.global_batch,
                                                    mirrored)
            log.info("activations at %s of %d images of %s%s in %.1fs", self.split.first_trainable,
                     int(self._cache[key][1].shape[0]), split, " (mirrored)" if mirrored else "",
                     time.perf_counter() - started)
        activations, labels = self._cache[key]
        first = self._first_examples(split, subset)
        if first is None:
            return activations, labels
        # The shard's share of the split's first examples, as the image pipeline takes them.
        count = data_lib.shard_count(self.data, split, first, input_context(self.strategy))
        return activations[:count], labels[:count]

    def _features(self, split: str, mirrored: bool = False, subset: float = 1.0):
        """Pooled backbone features of this worker's shard (its first `subset` share): from the
        cached bottom activations when the fine-tune phase caches them, else from images."""
        # The activations' time is logged on its own: get them before the clock starts.
        cached = None if self.split is None else self._activations(split, mirrored, subset)
        started = time.perf_counter()
        if cached is None:
            features, labels = self._extract_features(self.data, split, self.config.model.image_size,
                                                      self.global_batch, mirrored, self._first_examples(split, subset))
        else:
            activations, labels = cached
            features = features_lib.in_batches(self._top_features, activations)
        log.info("backbone features of %d images of %s%s in %.1fs", int(labels.shape[0]), split,
                 " (mirrored)" if mirrored else "", time.perf_counter() - started)
        return features, labels

    def _cached_datasets(self, cache, phase: Phase, phase_step: int, eval_batch: int):
        """(train, val) over cached per-image tensors, `cache(split, mirrored) -> (tensors, labels)`."""
        d, seed, subset = self.data, self.config.train.seed, phase.config.subset
        inputs, labels = cache(d.train_split, subset=subset)
        mirrored = cache(d.train_split, mirrored=True, subset=subset)[0] if self.augment(phase) == "flip" else None
        train = self.distribute(lambda b, ctx: features_lib.train_dataset(
            inputs, labels, b, d.shuffle_buffer, seed, self._skip_batches(phase_step, ctx), mirrored))
        if not d.val_split:
            return train, None
        val_inputs, val_labels = cache(d.val_split)
        if self.config.model.flip_tta:
            val_inputs = (val_inputs, cache(d.val_split, mirrored=True)[0])
        val = self.strategy.distribute_datasets_from_function(
            lambda ctx: features_lib.eval_dataset(val_inputs, val_labels, eval_batch))
        return train, val
