"""Checks of what a command will read and write, made before TensorFlow loads.

`python -m job` runs them on the machine it starts on; a Ray run (job.launch.preflight)
runs the data and weights checks in a task on a node where its workers run. Either way a
wrong dataset name, split, weights path or workdir fails once, in seconds, with one line.
"""

from __future__ import annotations

import os
from typing import Optional

from job.config import Config


def splits_read_by(command: str, config: Config) -> list[str]:
    if command == "evaluate":
        return [config.data.eval_split]
    if command == "export":  # LiteRT: int8 calibrates on the train split; files are measured on eval_split
        litert = config.export.litert
        return ([config.data.train_split] if "int8" in litert else []) + (
            [config.data.eval_split] if litert and config.export.measure else [])
    return [config.data.train_split] + ([config.data.val_split] if config.data.val_split else [])


def check_inputs(config: Config, command: str) -> None:
    """DataError or WeightsError if what `command` reads is missing or malformed."""
    from job.data import dataset_info
    from job.model import check_weights_file

    dataset_info(config.data, splits_read_by(command, config), prepare=False)
    if command in ("train", "benchmark"):
        check_weights_file(config.model.weights, config.model.alpha)


def workdir_problem(workdir: str) -> Optional[str]:
    """Checked without writing: a URI's bucket must exist; a path, or the nearest folder above it
    that exists, must be a writable directory."""
    from job import storage

    if storage.is_uri(workdir):
        problem = storage.uri_problem(workdir)
        return problem and f"workdir={workdir!r}: {problem}"
    path = os.path.abspath(workdir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if os.path.isdir(path) and os.access(path, os.W_OK):  # access() also sees a read-only mount
        return None
    return f"workdir={workdir!r}: cannot create or write it ({path} is not a writable directory)"
