"""What runs inside one Ray Tune trial of `python -m job tune`: an ordinary run of the job.

The trial function (`run_trial`) builds the trial's config (the search's base config, the
sampled settings, its own workdir `<workdir>/tune/<trial>`) and runs it:
  - `ray.enabled=false`: `job.train.train_and_evaluate` in the trial's own process (the Tune
    function trainable's thread), as `python -m job train` runs it. Each
    validation goes to `ray.tune.report`; when the scheduler stops the trial, Tune's session
    ends the thread inside that call (the checkpoints written so far stay in the workdir).
  - `ray.enabled=true`: `job.launch.train_on_ray`, the same Ray Train run `train` starts
    (TensorflowTrainer, ray.num_workers workers, restarts), with `ValidationsToTune`
    added to its callbacks: Ray's supported Train-in-Tune pattern, where the Train
    controller passes the workers' reports on to the trial. When the scheduler stops the
    trial, Tune ends the trial's actor, and with it the Train controller and workers it owns.
Only validation reports reach Tune (a checkpoint-only report has no metric), so a trial's
`training_iteration` is the number of validations it has done: the unit of ASHA's grace period.
Trials are not exported (the best one is trained again from best.yaml; `python -m job export`
exports any trial's workdir, its final checkpoint being there like any run's).
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from job.config import Config, with_settings

# What a validation report carries to Tune (the job's reports also hold a weights digest).
TUNE_METRICS = ("val_accuracy", "val_loss", "phase", "step", "total_steps")


def trial_name(trial_id: str) -> str:
    """`trial_00003`: the trial's index in the search (stable when the search is restored)."""
    return "trial_" + trial_id.rsplit("_", 1)[-1]


def trial_dirname(trial) -> str:
    """Tune's name and directory for a trial (TuneConfig.trial_name_creator / trial_dirname_creator)."""
    return trial_name(trial.trial_id)


def trial_config(base: dict, settings: dict, workdir: str) -> Config:
    config = with_settings(Config.model_validate(base), settings)
    config.workdir = workdir
    config.telemetry.progress_bar = False  # no terminal: a progress line at most every progress_every_s
    config.export.after_train = False  # `python -m job export` exports the trial a user picks
    return config


def validation_metrics(report: dict) -> Optional[dict]:
    """The metrics to pass on to Tune, or None for a report without a validation."""
    if "val_accuracy" not in report:
        return None
    return {key: report[key] for key in TUNE_METRICS if key in report}


class ValidationsToTune(TuneReportCallback):
    """Ray Train callback (on the Train controller): each validation the workers report goes to
    the Tune trial that started the run; checkpoint-only reports do not."""

    def after_report(self, run_context, metrics, checkpoint):
        passed = validation_metrics(metrics[0])  # every rank reports the same all-reduced metrics
        if passed is not None:
            super().after_report(run_context, [passed], checkpoint)


def run_trial(settings: dict, payload: dict) -> None:
    """The Tune function trainable: `settings` are the sampled dotted settings."""
    # The driver's data and weights locations; its working directory where this node has it
    # (Tune moves a trial into its own directory, which relative paths must not depend on).
    os.environ.update(payload["env"])
    if os.path.isdir(payload["cwd"]):
        os.chdir(payload["cwd"])
    from job import storage

    name = trial_name(tune.get_context().get_trial_id())
    config = trial_config(payload["config"], settings, storage.join(payload["root"], name))
    if config.ray.enabled:
        from job.launch import train_on_ray

        train_on_ray(config, callbacks=(ValidationsToTune(),))
    else:
        _train_in_this_process(config)


def _train_in_this_process(config: Config) -> None:
    import logging

    from job.checkpoints import INDEX
    from job.distribute import WorkerShare
    from job.storage import Workdir, is_uri
    from job.train import train_and_evaluate

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    remote: list[Workdir] = []

    def report(metrics: dict, checkpoint_dir: Optional[str]) -> None:
        # With a reporter the train loop leaves persisting checkpoints to it (as Ray does):
        # a URI workdir gets them from the local scratch they were saved in.
        if checkpoint_dir and is_uri(config.workdir):
            if not remote:
                remote.append(Workdir(config.workdir, os.path.dirname(checkpoint_dir)))
            remote[0].push("checkpoints", mirror=True, last=(INDEX,))
        passed = validation_metrics(metrics)
        if passed is not None:
            tune.report(passed)  # returns, or ends this thread when the scheduler stops the trial

    # The trial's CPUs (ray.cpus_per_worker, what Tune reserved for it) size TensorFlow's pools.
    train_and_evaluate(config, reporter=report, share=WorkerShare(config.ray.cpus_per_worker, "ray.cpus_per_worker"))


class TrialTable(tune.Callback):
    """On the driver: a line of the table (job.tune.table_lines) on the console as each trial
    ends, finished, stopped early or failed."""

    def __init__(self, search):
        self.search, self.printed = search, 0

    def _print(self, trial, failed: bool) -> None:
        from job.tune import outcome, table_lines

        name, metric = trial_name(trial.trial_id), self.search.metric
        ended = "failed" if failed else outcome(trial.last_result)
        row = {"trial": name, **{key: trial.config.get(key) for key in self.search.space},
               f"best_{metric}": trial.metric_analysis.get(metric, {}).get(self.search.mode),
               "validations": trial.last_result.get("training_iteration", 0), "ended": ended,
               "stopped_early": ended == "stopped", "wall_seconds": trial.last_result.get("time_total_s", 0.0)}
        print("\n".join(table_lines([row], self.search, header=not self.printed)), file=sys.stderr, flush=True)
        self.printed += 1

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._print(trial, failed=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._print(trial, failed=True)

