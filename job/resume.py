"""Resuming with changed settings: which changes keep a saved step meaning what it meant.

A checkpoint's step counts batches of one global batch size drawn from one split of one
dataset, at one image size, for one model. Change one of those and step N of the checkpoint
is a different point of a different run: the data position, the learning-rate schedule
and the phase boundaries silently shift. Such a rerun is refused (exit 2, one line naming
each changed setting with both values) and the workdir's config.yaml is left alone. Other
changes (epochs, learning rates, logging, the profile window, the worker count when the
global batch is fixed) are accepted and logged; the new config.yaml is written and the
old one kept beside it as config.<time it was written>.yaml.

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
        unsafe.insert(0, f"global batch {record['global_batch']} before, {global_batch} now")
    if unsafe:
        raise ConfigError(f"workdir {workdir.location!r} holds a run whose saved steps mean something else with these "
                          f"settings: {'; '.join(unsafe)}; use another workdir, or set them back")
    return [f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items() if key not in ("workdir",)]


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
