"""Resuming with changed settings: which changes keep a saved step meaning what it meant.

A checkpoint's step counts batches of one global batch size drawn from one split of one
dataset, at one image size, for one model. Change one of those and step N of the checkpoint
is a different point of a different run: the data position, the learning-rate schedule
and the phase boundaries silently shift. Such a rerun is refused (exit 2, one line naming
each changed setting with both values) and the workdir's config.yaml is left alone. Other
changes (epochs, learning rates, logging, the profile window, the worker count when the
global batch is fixed) are accepted and logged; the new config.yaml is written and the
old one kept beside it as config.<time it was written>.yaml.

Settings can also change what a checkpoint must hold: another optimizer has other slots,
another unfreeze depth trains other variables, loss scaling wraps the optimizer. Before any
restore, `check_saved_state` compares the newest checkpoint's layout with the one these
settings need (job.checkpoints) and names, in one line with both values, each changed setting
that makes the difference (the one whose old value alone would give the saved layout: found
by building the optimizers for it, not from a list). An optimizer whose phase is not under
way at the checkpoint's step (finished, or not started) or, with train.reset_optimizer=true,
any optimizer starts fresh and the weights are restored (one log line); otherwise, and for a
difference in the model itself, the rerun is refused (exit 2) before anything is written.

The record of a run (`run.json` in the workdir) holds what the config alone does not: the
global batch actually used (per_replica_batch_size x replicas), and the dataset's classes,
which export and evaluate then need no dataset for.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional

import yaml

from job.config import Config, dump_config
from job.errors import ConfigError
from job.storage import Workdir

log = logging.getLogger(__name__)

RUN_RECORD = "run.json"
# Settings that decide what a saved step means, or what the saved weights are.
STEP_DEFINING = ("data.name", "data.train_split", "data.val_split", "model.image_size", "model.alpha",
                 "model.dropout", "train.seed")


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_previous(workdir: Workdir) -> tuple[Optional[dict], Optional[dict]]:
    """(config.yaml as a flat dict, run.json) of the run that last used `workdir`, if any (fetched for a URI)."""
    found = {}
    for name in ("config.yaml", RUN_RECORD):
        try:
            if workdir.pull(name):
                with open(workdir.path(name)) as f:
                    found[name] = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            pass
    previous_config = found.get("config.yaml")
    return (_flat(previous_config) if isinstance(previous_config, dict) else None), found.get(RUN_RECORD)


def check_resume(workdir: Workdir, config: Config, global_batch: int) -> list[str]:
    """ConfigError if the workdir's last run used other step-defining settings; the list of
    other settings that changed ("key: old -> new"), to be logged."""
    previous, record = read_previous(workdir)
    if previous is None:
        return []
    now = _flat(config.model_dump(mode="json"))
    changed = {key: (previous[key], now[key]) for key in now if key in previous and previous[key] != now[key]}
    unsafe = [f"{key} {old!r} before, {new!r} now" for key, (old, new) in changed.items() if key in STEP_DEFINING]
    if record and record.get("global_batch") not in (None, global_batch):
        why = f"global batch {record['global_batch']} before, {global_batch} now"
        per_replica = config.train.per_replica_batch_size
        if per_replica:
            why += (f" (train.per_replica_batch_size={per_replica} x {global_batch // per_replica} replicas; "
                    f"train.batch_size={record['global_batch']} train.per_replica_batch_size=null keeps the global "
                    "batch fixed on any worker count)")
        unsafe.insert(0, why)
    if unsafe:
        raise ConfigError(f"workdir {workdir.location!r} holds a run whose saved steps mean something else with these "
                          f"settings: {'; '.join(unsafe)}; use another workdir, or set them back")
    return [f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items() if key not in ("workdir",)]


def check_saved_state(run, directory: str, previous: Optional[dict], location: str) -> frozenset:
    """Before any restore: the top-level objects (optimizers) of `run`'s checkpoint to start
    fresh because the newest checkpoint in `directory` holds their state for other settings;
    ConfigError (exit 2) where that is refused. `previous`: the last run's settings (flat), to
    name what changed; `location`: the workdir, for messages."""
    from job.checkpoints import checkpoints_to_try, layout_differences, needed_layout, saved_layout

    for path in checkpoints_to_try(directory):
        try:
            saved, step = saved_layout(path)
            break
        except Exception:  # noqa: BLE001 - damaged: restore_newest says so and falls back past it
            continue
    else:
        return frozenset()
    needed = needed_layout(run.checkpoint())
    differences = layout_differences(saved, needed)
    if not differences:
        return frozenset()
    settings = "; ".join(_settings_shaping(run, previous, needed)) or "settings changed since it was saved"
    what = "; ".join(f"{name}: {why}" for name, why in differences.items())
    name_of = os.path.basename(path)
    phases = {phase.name: phase for phase in run.phases}
    if set(differences) - set(phases):  # the model or the step itself: nothing to start fresh
        raise ConfigError(f"workdir {location!r}: checkpoint {name_of} holds a model these settings do not build "
                          f"({settings}; {what}); set them back, or use another workdir")
    busy = [name for name in differences if step is not None and phases[name].first_step < step < phases[name].end]
    if busy and not run.config.train.reset_optimizer:
        raise ConfigError(
            f"workdir {location!r}: checkpoint {name_of} holds the {' and '.join(busy)} optimizer state of other "
            f"settings ({settings}; {what}) and that phase is under way at step {step}: set them back, use another "
            "workdir, or set train.reset_optimizer=true to keep the weights and start the optimizer fresh")
    why = ("train.reset_optimizer=true" if busy else
           "its phase is not under way at step " + str(step))
    log.info("checkpoint %s holds the %s optimizer state of other settings (%s; %s): restoring the weights, "
             "the optimizer starts fresh (%s)", name_of, " and ".join(differences), settings, what, why)
    return frozenset(differences)


def start_fresh(run, fresh: frozenset) -> None:
    """After a restore that left the `fresh` optimizers alone: their step count where the run is,
    so that each learning-rate schedule goes on from the restored step rather than from 0."""
    for phase in run.phases:
        if phase.name in fresh:
            optimizer = run.optimizers[phase.name]
            done = min(max(run.global_step - phase.first_step, 0), phase.steps)
            for counter in {id(o.iterations): o.iterations for o in (optimizer, getattr(optimizer, "inner_optimizer", optimizer))}.values():
                counter.assign(done)


def _settings_shaping(run, previous: Optional[dict], needed: dict) -> list[str]:
    """Each changed setting whose old value alone gives another checkpoint layout than these
    settings: "key old before, new now"."""
    if not previous:
        return []
    now = _flat(run.config.model_dump(mode="json"))
    changed = {key: (previous[key], new) for key, new in now.items()
               if key not in ("workdir", "train.reset_optimizer") and key in previous and previous[key] != new}
    named, entangled = [], []
    for key, (old, new) in changed.items():
        variant = _with_setting(run.config, key, old)
        if variant is None:  # not valid alone (cache_frozen=true needs unfreeze=N): changed with another
            entangled.append(key)
        elif _layout_for(run, variant) != needed:
            named.append(key)
    # No setting alone explains it: those that can only change together, else every change.
    return [f"{key} {changed[key][0]!r} before, {changed[key][1]!r} now" for key in (named or entangled or changed)]


def _with_setting(config: Config, key: str, value) -> Optional[Config]:
    """`config` with one dotted setting set to `value`; None if that alone is not a valid config."""
    tree = config.model_dump(mode="json")
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node[part]
    node[leaf] = value
    try:
        return Config.model_validate(tree)
    except Exception:  # noqa: BLE001 - e.g. cache_frozen without unfreeze=N
        return None


def _layout_for(run, config: Config) -> dict:
    """The checkpoint layout `run`'s model and optimizers built for `config` would save."""
    import tensorflow as tf

    from job.checkpoints import needed_layout
    from job.step import learning_rate_scale, make_optimizer
    from job.train import plan_phases

    try:
        phases = plan_phases(config, run.info.split_sizes[run.config.data.train_split], run.global_batch)
    except ConfigError:
        return {}
    lr_scale = learning_rate_scale(config.train, run.global_batch)
    optimizers = {}
    try:
        with run.strategy.scope():
            for phase in phases:
                optimizer = make_optimizer(phase, phase.steps_per_epoch, lr_scale, config.train.precision)
                optimizer.build(run.trainable(phase))
                optimizers[phase.name] = optimizer
        return needed_layout(tf.train.Checkpoint(model=run.model.classifier, step=run.step, **optimizers))
    finally:
        run.trainable(run.phases[-1])  # as Run left the model


def write_run_files(workdir: Workdir, config: Config, record: dict) -> None:
    """config.yaml (the old one kept as config.<its time>.yaml if it differs) and run.json, pushed."""
    path, text = workdir.path("config.yaml"), dump_config(config)
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if old != text:
            kept = f"config.{time.strftime('%Y%m%dT%H%M%S', time.gmtime(os.path.getmtime(path)))}.yaml"
            os.replace(path, workdir.path(kept))
            workdir.push(kept)
    with open(path, "w") as f:
        f.write(text)
    with open(workdir.path(RUN_RECORD), "w") as f:
        json.dump(record, f, indent=1)
    workdir.push("config.yaml")
    workdir.push(RUN_RECORD)


def read_run_record(directory: str) -> Optional[dict]:
    try:
        with open(os.path.join(directory, RUN_RECORD)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
