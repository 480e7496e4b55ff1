"""Command line: python -m job {train,evaluate,export,benchmark} CONFIG [key=value ...] | tune | predict | tensorboard

Exit status 0 on success (also after a clean stop on SIGTERM/SIGINT, ready to resume),
2 on bad input or environment (config, data, weights, busy or unwritable workdir, disk
full) with one line on stderr, 1 when training itself fails (e.g. a non-finite loss).
docs/failures.md lists every failure case and what the job does.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import signal
import sys
import tempfile

log = logging.getLogger("job")

# OSErrors that mean "fix the machine, then rerun", not a bug: one line, exit status 2.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m job", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in [
        ("train", "train both phases (resumes from the workdir's checkpoint), then export"),
        ("evaluate", "accuracy of a workdir's latest checkpoint or exported model on data.eval_split"),
        ("export", "write the workdir's latest checkpoint as a model that takes raw uint8 images"),
        ("benchmark", "time the input pipeline, the train step and both together; writes <workdir>/benchmark.json"),
    ]:
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("config", help="YAML config file, e.g. configs/cifar10_quick.yaml")
        p.add_argument("overrides", nargs="*", help="dotted settings, e.g. train.batch_size=128 workdir=runs/x")
        if name == "benchmark":
            p.add_argument("--phase", choices=["head", "finetune", "all"], default="all")
            p.add_argument("--steps", type=int, default=20, help="train steps per timed repeat (default 20)")
            p.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported (default 3)")
            p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (default 2)")
            p.add_argument("--matmul-sizes", type=lambda s: tuple(int(n) for n in s.split(",")), default=(1024, 2048, 4096),
                           help="square matmul sizes whose best rate is the peak (default 1024,2048,4096)")
            p.add_argument("--profile", action="store_true", help="also trace end-to-end steps with the TF profiler")
            p.add_argument("--accelerator-rate", type=float, default=2500.0,
                           help="images/s one accelerator trains at, for the input cores it needs (default 2500, assumed)")
        if name == "export":
            p.add_argument("--litert", metavar="KINDS", help="also LiteRT files for phones: float16, int8 or "
                           "float16,int8 (export/model_<kind>.tflite), measured against the SavedModel")
        if name == "evaluate":
            p.add_argument("--model", metavar="PATH", help="a model file instead of the workdir: a .tflite file, "
                           "a SavedModel folder or a model.keras file")
    search = sub.add_parser("tune", help="hyperparameter search with Ray Tune: each trial an ordinary run of the job",
                            description="a search over the dotted settings SEARCH.yaml names (docs/tune.md); writes "
                                        "<workdir>/tune/results.csv and best.yaml; a rerun resumes it")
    search.add_argument("config", help="YAML config file the trials start from, e.g. configs/cifar10_quick.yaml")
    search.add_argument("search", help="the search: trials, metric, scheduler, max_concurrent, space "
                        "(e.g. configs/tune_quick.yaml)")
    search.add_argument("overrides", nargs="*", help="dotted settings for every trial, e.g. workdir=runs/search")
    guess = sub.add_parser("predict", help="the top classes, by name, of image files, from a trained workdir or export",
                           description="the top classes, by name, of image files, from a trained workdir or export")
    guess.add_argument("model", help="a workdir (path or s3://, gs://), an export folder, a model.keras file, "
                       "a SavedModel folder or a .tflite file")
    guess.add_argument("images", nargs="+", help="image files or folders of them (JPEG, PNG, GIF, BMP)")
    guess.add_argument("--top-k", type=int, default=3, help="classes per image (default 3)")
    guess.add_argument("--json", action="store_true", help="one JSON object per image and line")
    prep = sub.add_parser("prepare", help="an image tree (path, s3://, gs://) as a sharded TFDS dataset",
                          description="IMAGE_DIR/<split>/<class>/<image> (or <class>/<image>) -> DATA_DIR/NAME/1.0.0/: "
                                      "record files TFDS reads; train with data.name=NAME data.data_dir=DATA_DIR")
    prep.add_argument("image_dir", help="the image tree: a path, s3://bucket/prefix or gs://bucket/prefix")
    prep.add_argument("data_dir", help="the TFDS data_dir to write into: a path, s3:// or gs://")
    prep.add_argument("--name", required=True, help="the dataset's name, e.g. my_images")
    prep.add_argument("--shard-mb", type=float, default=150.0, help="MB of images per shard (default 150)")
    prep.add_argument("--min-shards", type=int, default=16,
                      help="shards per split at least, so each worker reads files of its own (default 16)")
    prep.add_argument("overrides", nargs="*", help="settings, e.g. ray.enabled=true ray.address=auto")
    board = sub.add_parser("tensorboard", help="TensorBoard on a workdir (a path, gs:// or s3://), following it while it runs",
                           description="TensorBoard on a workdir (a path, gs:// or s3://), following it while it runs")
    board.add_argument("workdir", help="the run's workdir, e.g. runs/cifar10_quick or s3://bucket/runs/x")
    board.add_argument("--host", default="127.0.0.1")
    board.add_argument("--port", type=int, default=6006)
    board.add_argument("--every", type=float, default=30.0, help="seconds between copies of a remote workdir (default 30)")
    return parser


def _fail(message: str, status: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


@contextlib.contextmanager
def _native_stderr_to_debug_log():
    """Keep TensorFlow's C++ start-up lines (oneDNN, CUDA probing) off stderr.

    absl prints them before it is initialised, so no log level hides them; without this a
    bad-input error would not be the one line it should be. They go to the debug log;
    TF_CPP_MIN_LOG_LEVEL=0 shows them as they come.
    """
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode(errors="replace").splitlines():
                log.debug("tensorflow start-up: %s", line)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def parse_command_line(argv=None) -> argparse.Namespace:
    """Like parse_args, but key=value overrides may also follow the options
    (`benchmark CONFIG --phase finetune train.batch_size=128`); argparse alone stops
    collecting positionals at the first option, and its intermixed mode rejects subcommands."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra and not hasattr(args, "overrides"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = [*getattr(args, "overrides", []), *extra]
    if getattr(args, "litert", None):  # a setting like any other: validated (one line) with the rest
        args.overrides.append(f"export.litert=[{args.litert}]")
    return args


def main(argv=None) -> int:
    args = parse_command_line(argv)
    # Outside train steps SIGTERM ends the command like Ctrl-C; inside them the train loop's
    # own handler takes over and saves a checkpoint at the next step boundary first.
    signal.signal(signal.SIGTERM, _interrupt)
    from job.errors import JobError

    try:
        return _run(args)
    except JobError as err:
        return _fail(str(err), err.exit_status)
    except OSError as err:
        if err.errno not in _ENVIRONMENT_ERRNOS:
            raise
        return _fail(f"cannot write {err.filename}: {err.strerror}", 2)


def _predict(args: argparse.Namespace) -> int:
    """Prints a line (or a JSON object) per image; exit 2 if not one of them could be read."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with _native_stderr_to_debug_log():
        import tensorflow as tf

        tf.config.list_physical_devices()
    from job.predict import format_line, predict

    answered = 0
    for result in predict(args.model, args.images, args.top_k):
        print(json.dumps(result) if args.json else format_line(result), flush=True)
        answered += "top" in result
    return 0 if answered else 2


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # TFDS logs every dataset it opens (and warns about every version folder it probes),
    # tf.distribute every reduction it plans.
    logging.getLogger("absl").setLevel(logging.ERROR)
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    # TensorFlow's native start-up lines (oneDNN, CUDA probing): off unless telemetry.verbose.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "2")


def _train(config) -> int:
    from job.errors import Preempted
    from job.export import export
    from job.train import train_and_evaluate

    try:
        if config.ray.enabled:
            from job.launch import train_on_ray

            summary = train_on_ray(config)
        else:
            summary = train_and_evaluate(config)
            # The other workers of a multi-worker run write no shared files.
            if summary["chief"] and config.export.after_train:
                export(config, config.workdir)
    except Preempted as stop:
        print(str(stop), file=sys.stderr)
        return 0
    print(json.dumps({k: summary[k] for k in ("status", "step", "wall_seconds", "final_val_accuracy")}))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from job.config import load_config
    from job.errors import ConfigError
    from job.prepare import prepare

    if args.shard_mb <= 0 or args.min_shards < 1:
        raise ConfigError(f"--shard-mb={args.shard_mb} --min-shards={args.min_shards}: "
                          "a positive size and at least one shard")
    config = load_config(None, args.overrides)
    _configure_logging(config.telemetry.verbose)
    with _native_stderr_to_debug_log():
        import tensorflow  # noqa: F401 - its start-up lines go to the debug log
    print(json.dumps(prepare(args.image_dir, args.data_dir, args.name, config, args.shard_mb, args.min_shards)))
    return 0


def _tune(args: argparse.Namespace) -> int:
    """Every setting the search can give is checked before Ray starts (job.tune.load_search)."""
    from job.config import load_config
    from job.preflight import check_inputs, workdir_problem

    config = load_config(args.config, args.overrides)
    from job.tune import load_search, run_search

    search = load_search(args.search, config)
    _configure_logging(config.telemetry.verbose)
    if problem := workdir_problem(config.workdir):
        from job.errors import WorkdirError

        raise WorkdirError(problem)
    with _native_stderr_to_debug_log():  # TensorFlow's start-up lines (TFDS, Ray Train import it)
        if not config.ray.enabled:  # on Ray the trials check data and weights where their workers run
            check_inputs(config, "train")
        import job.launch  # noqa: F401
    command = " ".join(["python -m job tune", args.config, args.search, *args.overrides])
    print(json.dumps(run_search(config, search, command)))
    return 0


def _run(args: argparse.Namespace) -> int:
    from job.config import load_config

    if args.command == "predict":
        return _predict(args)
    if args.command == "tensorboard":
        from job.follow import follow

        _configure_logging(verbose=False)
        return follow(args.workdir, args.host, args.port, args.every)

    if args.command == "prepare":
        return _prepare(args)
    if args.command == "tune":
        return _tune(args)
    config = load_config(args.config, args.overrides)
    _configure_logging(config.telemetry.verbose)
    from job.errors import WorkdirError
    from job.preflight import check_inputs, workdir_problem

    # Data settings from TFDS metadata, the weights file from its HDF5 header and the workdir
    # from its permissions, before TensorFlow loads: a wrong name, split, data_dir or path
    # fails in a second. (On Ray the data and weights may exist only on the workers: the
    # same checks run there, in job.launch.preflight.)
    if not (config.ray.enabled and args.command == "train"):
        check_inputs(config, args.command)
        if args.command == "train" and (problem := workdir_problem(config.workdir)):
            raise WorkdirError(problem)
    with _native_stderr_to_debug_log():
        import tensorflow as tf

        tf.config.list_physical_devices()  # CUDA probing prints here
    # Heavy imports after validation: bad input is reported in a fraction of a second.
    if args.command == "train":
        return _train(config)
    from job.export import evaluate, export

    if args.command == "benchmark":
        from job.benchmark import Budget, benchmark, format_table

        phases = ["head", "finetune"] if args.phase == "all" else [args.phase]
        report = benchmark(config, phases, Budget(args.steps, args.repeats, args.warmup, args.matmul_sizes,
                                                  accelerator_images_per_sec=args.accelerator_rate), args.profile)
        print(format_table(report))
        print(f"wrote {os.path.join(config.workdir, 'benchmark.json')}")
    elif args.command == "export":
        print(export(config, config.workdir))
    else:
        print(json.dumps(evaluate(config, config.workdir, config.data.eval_split, args.model)))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        # SIGINT/SIGTERM outside a train step (start-up, validation, export): nothing new to save.
        sys.exit(_fail("interrupted outside a train step; checkpoints written so far are kept: "
                       "rerun the same command to resume", 130))
