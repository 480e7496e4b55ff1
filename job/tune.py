"""`python -m job tune CONFIG SEARCH.yaml [key=value ...]`: a hyperparameter search with Ray Tune.

SEARCH.yaml names the trials, the metric, the scheduler and the space over dotted settings:

    trials: 8                    # trials sampled from the space (a `grid` runs each of its values this many times)
    metric: val_accuracy         # maximized (val_loss: minimized); reported after each validation
    scheduler: asha              # or none; ASHA's grace period and rungs count validations
    grace_period: 1
    reduction_factor: 2
    max_concurrent: 2
    seed: 0                      # optional: the same trials on every run
    space:
      train.finetune.learning_rate: {loguniform: [1.0e-4, 1.0e-3]}
      train.finetune.epochs: {choice: [1, 2]}

Everything is checked before Ray starts: the file's keys, each distribution's arguments, and
every value the space can give (each choice, both bounds and an inner value of a range) against
the config schema, each on its own on top of CONFIG and the overrides; a problem is one line
and exit status 2. The search itself is Ray Tune's (job.tune_trial runs each trial):
BasicVariantGenerator (random and grid sampling, max_concurrent), ASHAScheduler, Tune's CSV, JSON and
TensorBoard loggers, Tuner.restore. Under `<workdir>/tune/`:
    trial_00000/ ...    each trial's workdir: an ordinary run of the job (resumable, exportable)
    search/             Tune's experiment (its state, each trial's progress.csv and event files)
    results.csv         a row per trial: its settings, best metric, validations, how it ended, time
    best.yaml           the best trial's full config, workdir <workdir>/tune/best: `python -m job train` runs it
    search.json         the config and search the experiment was started with
Rerunning the same command after an interruption restores the experiment (Tuner.restore).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import Field, ValidationError

from job import storage
from job.config import Config, _describe, _Section, dump_config, with_settings
from job.errors import ConfigError, JobError

log = logging.getLogger(__name__)

MODES = {"val_accuracy": "max", "val_loss": "min"}
# Distribution -> (number of arguments or None for a list of values, Ray Tune's function).
DISTRIBUTIONS = {"uniform": (2, "uniform"), "quniform": (3, "quniform"), "loguniform": (2, "loguniform"),
                 "qloguniform": (3, "qloguniform"), "randint": (2, "randint"), "lograndint": (2, "lograndint"),
                 "choice": (None, "choice"), "grid": (None, "grid_search")}
EXAMPLE = "e.g. {loguniform: [1.0e-4, 1.0e-3]} or {choice: [96, 128]}"


class SearchFailed(JobError):
    """Not one trial reported the metric: there is no best trial."""

    exit_status = 1


class SearchInterrupted(JobError):
    """Ctrl-C or SIGTERM during the search: Ray Tune saved its state; the same command resumes it."""

    exit_status = 130


class Search(_Section):
    trials: int = Field(8, ge=1)
    metric: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, ge=1)  # validations before ASHA may stop a trial
    reduction_factor: float = Field(2.0, gt=1.0)  # ASHA keeps 1/reduction_factor at each rung
    max_concurrent: int = Field(1, ge=1)
    seed: Optional[int] = None
    space: dict[str, Any] = Field(min_length=1)

    @property
    def mode(self) -> str:
        return MODES[self.metric]


def load_search(path: str, base: Config) -> Search:
    """SEARCH.yaml, validated against the schema and `base` (CONFIG with its overrides)."""
    where = f"search file {path!r}"
    if not Path(path).is_file():
        raise ConfigError(f"{where} does not exist")
    try:
        tree = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise ConfigError(f"{where}{f' line {mark.line + 1}' if mark else ''}: invalid YAML "
                          f"({getattr(err, 'problem', err)})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: top level must be a mapping (trials, metric, scheduler, max_concurrent, space)")
    try:
        search = Search.model_validate(tree)
    except ValidationError as err:
        message = _describe(err.errors())
        if message.startswith("space:") and "at least 1" in message:
            message = f"space: names no setting to search ({EXAMPLE})"
        raise ConfigError(f"{where}: {message}") from None
    for key, spec in search.space.items():
        for value in _values_to_check(key, spec, where):
            if key == "workdir":
                raise ConfigError(f"{where}: space.workdir: each trial's workdir is <workdir>/tune/<trial>; "
                                  "search other settings")
            try:
                with_settings(base, {key: value})
            except ConfigError as err:
                raise ConfigError(f"{where}: space.{key} {_inline(spec)}: {err}") from None
    return search


def _inline(spec) -> str:
    return json.dumps(spec, separators=(", ", ": ")).replace('"', "")


def _values_to_check(key: str, spec, where: str) -> list:
    """The values the distribution can give that the schema must accept: every listed value,
    both bounds and an inner value of a range (so an int setting sees a fractional sample)."""
    bad = f"{where}: space.{key}"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"{bad}={spec!r}: must be one of {', '.join(DISTRIBUTIONS)} with its arguments ({EXAMPLE})")
    (kind, args), = spec.items()
    count, _ = DISTRIBUTIONS[kind]
    if count is None:
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{bad} {_inline(spec)}: {kind} needs a non-empty list of values")
        return args
    if not isinstance(args, list) or len(args) != count or not all(
            isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in args):
        names = {2: "[low, high]", 3: "[low, high, q]"}[count]
        raise ConfigError(f"{bad} {_inline(spec)}: {kind} needs {names} (numbers)")
    low, high = args[0], args[1]
    if not low < high:
        raise ConfigError(f"{bad} {_inline(spec)}: low must be below high")
    if kind.startswith(("log", "qlog")) and low <= 0:
        raise ConfigError(f"{bad} {_inline(spec)}: {kind} needs low > 0")
    if count == 3 and args[2] <= 0:
        raise ConfigError(f"{bad} {_inline(spec)}: q must be > 0")
    if kind.endswith("randint"):
        if not all(isinstance(a, int) for a in args):
            raise ConfigError(f"{bad} {_inline(spec)}: {kind} needs integer bounds")
        return [low, high - 1]  # Tune's randint excludes the upper bound
    # An inner value off any round number (0.382 of the way), as a sample would be.
    inner = low * (high / low) ** 0.382 if kind.startswith(("log", "qlog")) else low + 0.382 * (high - low)
    if count == 3:
        inner = round(inner / args[2]) * args[2]
    return [low, high, inner]


def tune_space(search: Search) -> dict:
    from ray import tune

    space = {}
    for key, spec in search.space.items():
        (kind, args), = spec.items()
        function = getattr(tune, DISTRIBUTIONS[kind][1])
        space[key] = function(args) if DISTRIBUTIONS[kind][0] is None else function(*args)
    return space


# --- the search (on the driver) ---------------------------------------------------------
def run_search(config: Config, search: Search, command: str) -> dict:
    """Run (or resume) the search; write results.csv and best.yaml; return what the CLI prints."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from job import launch
    from job.tune_trial import TrialTable, run_trial, trial_dirname

    started_ray = launch._connect(config)
    try:
        nodes = sum(node["Alive"] for node in ray.nodes())
        workdir = launch.resolve_location("workdir", config.workdir, nodes)
        root = storage.join(workdir, "tune")
        base = config.model_copy(deep=True)
        base.workdir = root
        _claim(root, base, search)
        payload = {"config": base.model_dump(mode="json"), "root": root, "cwd": os.getcwd(),
                   "env": launch.worker_runtime_env()["env_vars"]}
        # A trial on one process reserves its CPUs; one on Ray Train next to nothing (Tune refuses
        # an empty request; Ray Train's controller takes no CPU), its workers reserve theirs.
        cpus = 0.01 if config.ray.enabled else config.ray.cpus_per_worker
        trainable = tune.with_resources(tune.with_parameters(run_trial, payload=payload), {"CPU": cpus})
        experiment = storage.join(root, "search")
        if tune.Tuner.can_restore(experiment):
            log.info("resuming the search in %s (Tuner.restore)", experiment)
            tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True)
        else:
            scheduler = (ASHAScheduler(time_attr="training_iteration", grace_period=search.grace_period,
                                       reduction_factor=search.reduction_factor, max_t=10_000)
                         if search.scheduler == "asha" else FIFOScheduler())
            tuner = tune.Tuner(
                trainable, param_space=tune_space(search),
                tune_config=tune.TuneConfig(
                    metric=search.metric, mode=search.mode, num_samples=search.trials, scheduler=scheduler,
                    search_alg=BasicVariantGenerator(random_state=search.seed, max_concurrent=search.max_concurrent),
                    trial_name_creator=trial_dirname, trial_dirname_creator=trial_dirname),
                run_config=tune.RunConfig(name="search", storage_path=root,
                                          verbose=1 if config.telemetry.verbose else 0,
                                          failure_config=tune.FailureConfig(max_failures=0),
                                          callbacks=[TrialTable(search)]))
        log.info("search: %d trials%s, metric %s (%s), scheduler %s, %d at a time; trials in %s",
                 search.trials, " per grid value" if _has_grid(search) else "", search.metric, search.mode,
                 search.scheduler, search.max_concurrent, root)
        grid, interrupted = _fit(tuner)
        if interrupted:
            raise SearchInterrupted(f"search stopped by signal {interrupted}: {grid.num_terminated + grid.num_errors} "
                                    f"trials ended, the experiment's state is saved in {experiment}; rerun the same "
                                    "command to resume it")
        rows = [_row(result, search, root) for result in grid if result.config is not None]
        return _write_outputs(rows, base, search, root, workdir, command)
    finally:
        if started_ray:
            ray.shutdown()


def _fit(tuner):
    """(Tuner.fit()'s results, the signal that stopped it or None). Ctrl-C and SIGTERM both take
    Tune's graceful way out (its SIGUSR1 handler: the trials end, the experiment's state is
    saved); Tune itself would take SIGINT alone and say nothing to its caller. Twice: abort."""
    received = []

    def stop(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        os.kill(os.getpid(), signal.SIGUSR1)

    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return tuner.fit(), (received[0] if received else None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _has_grid(search: Search) -> bool:
    return any("grid" in spec for spec in search.space.values())


def _claim(root: str, base: Config, search: Search) -> None:
    """Write search.json, or check that the search already in `root` is this one (a rerun resumes it)."""
    record = {"config": base.model_dump(mode="json"), "search": search.model_dump(mode="json")}
    folder = storage.Workdir.open(root)
    try:
        if folder.pull("search.json"):
            with open(folder.path("search.json")) as f:
                before = json.load(f)
            old, new = _flat(before), _flat(record)
            changed = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
            if changed:
                raise ConfigError(f"workdir={root!r} holds a search started with other settings "
                                  f"({', '.join(changed[:4])}): rerun it as it was to resume, or use another workdir")
            return
        os.makedirs(folder.local, exist_ok=True)
        with open(folder.path("search.json"), "w") as f:
            json.dump(record, f, indent=2)
        folder.push("search.json")
    finally:
        folder.close()


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and not (prefix == "search." and key == "space"):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def outcome(last: dict) -> str:
    """'finished' if the trial's last validation was at its run's last step, else 'stopped' (by
    the scheduler). A trial stopped at its last validation has done all its training: finished
    (Tune ended it before the job wrote summary.json; `train` on its workdir completes that)."""
    step, total = last.get("step"), last.get("total_steps")
    return "finished" if step is not None and step == total else "stopped"


def _best(values, mode: str) -> Optional[float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return (max if mode == "max" else min)(values) if values else None


def _row(result, search: Search, root: str) -> dict:
    trial = os.path.basename(result.path.rstrip("/"))
    history = result.metrics_dataframe
    values = list(history[search.metric]) if history is not None and search.metric in history else []
    metrics = result.metrics or {}
    ended = "failed" if result.error else outcome(metrics)
    error = (str(result.error).strip().splitlines() or [""])[-1][:300] if result.error else ""
    row = {"trial": trial, "ended": ended, **{key: result.config.get(key) for key in search.space},
           f"best_{search.metric}": _best(values, search.mode), "validations": len(values),
           "stopped_early": ended == "stopped", "wall_seconds": round(metrics.get("time_total_s", 0.0), 1),
           "error": error, "workdir": storage.join(root, trial)}
    return row


def _write_outputs(rows: list[dict], base: Config, search: Search, root: str, workdir: str, command: str) -> dict:
    rows.sort(key=lambda row: row["trial"])
    key = f"best_{search.metric}"
    scored = [row for row in rows if row[key] is not None]
    folder = storage.Workdir.open(root)
    try:
        with open(folder.path("results.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
            writer.writeheader()
            writer.writerows(rows)
        folder.push("results.csv")
        counts = {state: sum(row["ended"] == state for row in rows) for state in ("finished", "stopped", "failed")}
        if not scored:
            first = next((row["error"] for row in rows if row["error"]), "no trial reported a validation")
            raise SearchFailed(f"no trial reported {search.metric} ({len(rows)} trials, {counts['failed']} failed: "
                               f"{first}); {storage.join(root, 'results.csv')}")
        best = (max if search.mode == "max" else min)(scored, key=lambda row: row[key])
        settings = {name: best[name] for name in search.space}
        config = with_settings(base, settings)
        config.workdir = storage.join(root, "best")
        header = [f"# The best of {len(rows)} trials of: {command}",
                  f"# {best['trial']}: {search.metric} {best[key]:.4f} after {best['validations']} validations "
                  f"({best['ended']}); its workdir {best['workdir']}",
                  "# searched settings: " + " ".join(f"{name}={json.dumps(value)}" for name, value in settings.items()),
                  f"# python -m job train {storage.join(root, 'best.yaml')}"]
        with open(folder.path("best.yaml"), "w") as f:
            f.write("\n".join(header) + "\n" + dump_config(config))
        folder.push("best.yaml")
    finally:
        folder.close()
    print("\n".join(["all trials:", *table_lines(rows, search)]), file=sys.stderr, flush=True)
    return {"trials": len(rows), **counts, "best": {"trial": best["trial"], search.metric: best[key], **settings},
            "results": storage.join(root, "results.csv"), "best_config": storage.join(root, "best.yaml")}


def table_lines(rows: list[dict], search: Search, header: bool = True) -> list[str]:
    """The console table: fixed columns, so that lines printed as trials end line up."""
    headers = ["trial", *search.space, f"best {search.metric}", "validations", "ended", "time"]
    widths = [11, *(max(len(name), 10) for name in search.space), len(headers[-4]), 11, 13, 6]
    lines = [headers] if header else []
    for row in rows:
        value = row[f"best_{search.metric}"]
        lines.append([row["trial"], *(_short(row[name]) for name in search.space),
                      "-" if value is None else f"{value:.4f}", str(row["validations"]),
                      "stopped early" if row["stopped_early"] else row["ended"], f"{row['wall_seconds']:.0f}s"])
    return ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in lines]


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
