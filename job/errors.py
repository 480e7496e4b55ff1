"""The errors the job reports as one line on stderr, each with the exit status it ends with.

Every module raises a subclass of `JobError` for a problem the user can act on (a bad
setting, missing data, a busy workdir, a full disk, a diverged run); `python -m job` and the
Ray launcher catch `JobError` alone and print `error: <message>`. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class JobError(RuntimeError):
    """A problem with the run's input or environment; the message is one line fit for a user."""

    exit_status = 2  # fix the input or the machine, then rerun


class ConfigError(JobError):
    """A setting is wrong."""


class DataError(JobError):
    """The dataset cannot be read."""


class DeviceError(JobError):
    """The devices the run needs (GPUs) are not there."""


class WeightsError(JobError):
    """Backbone weights cannot be found or loaded."""


class WorkdirError(JobError):
    """The workdir cannot be created or written (read-only, under a file, no permission)."""


class WorkdirBusy(JobError):
    """Another live run holds the workdir."""


class CheckpointNotSaved(JobError):
    """A checkpoint could not be written (e.g. disk full); the previous one is untouched."""


class StorageUnavailable(JobError):
    """The workdir's object store stopped answering for longer than storage.outage_timeout_s;
    the message names the store and the newest checkpoint complete in it."""

    exit_status = 75  # EX_TEMPFAIL: nothing is wrong with the run; rerun once the store is back


class NoReadableCheckpoint(JobError):
    """Checkpoints exist but none reads back: the job refuses to start over on top of them."""


class NothingToLoad(JobError):
    """The workdir has neither a checkpoint nor an exported model."""


class LiteRTError(JobError):
    """A LiteRT (.tflite) file cannot be converted, loaded or run (an op LiteRT lacks, the
    ai-edge-litert package missing); the SavedModel export before it is complete."""


class NonFiniteLoss(JobError):
    """The loss or the weights became NaN or inf; the run stops without overwriting good checkpoints."""

    exit_status = 1  # training itself failed


class Preempted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was saved at the step boundary (exit status 0)."""
