"""Command line: python -m job {train,evaluate,export} CONFIG [key=value ...]

Exit status 0 on success (also after a clean stop on SIGTERM/SIGINT, ready to resume),
2 on bad input (config, data, weights, busy workdir) with one line on stderr, 1 when
training itself fails (e.g. a non-finite loss).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m job", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in [
        ("train", "train both phases (resumes from the workdir's checkpoint), then export"),
        ("evaluate", "accuracy of a workdir's latest checkpoint or exported model on data.eval_split"),
        ("export", "write the workdir's latest checkpoint as a model that takes raw uint8 images"),
    ]:
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("config", help="YAML config file, e.g. configs/cifar10_quick.yaml")
        p.add_argument("overrides", nargs="*", help="dotted settings, e.g. train.batch_size=128 workdir=runs/x")
    return parser


def _fail(message: str, status: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from job.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        return _fail(str(err), 2)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # TFDS logs every dataset it opens, tf.distribute every reduction it plans.
    for noisy in ("absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Heavy imports after validation: bad input is reported in a fraction of a second.
    from job.checkpoints import WorkdirBusy
    from job.data import DataError
    from job.model import WeightsError
    from job.serve import NothingToLoad, evaluate, export
    from job.train import NonFiniteLoss, Preempted, train_and_evaluate

    try:
        if args.command == "train":
            if config.ray.enabled:
                from job.launch import train_on_ray

                summary = train_on_ray(config)
            else:
                summary = train_and_evaluate(config)
                export(config, config.workdir)
            print(json.dumps({k: summary[k] for k in ("status", "step", "wall_seconds", "final_val_accuracy")}))
        elif args.command == "export":
            print(export(config, config.workdir))
        else:
            print(json.dumps(evaluate(config, config.workdir, config.data.eval_split)))
    except (ConfigError, DataError, WeightsError, WorkdirBusy, NothingToLoad) as err:
        return _fail(str(err), 2)
    except PermissionError as err:
        return _fail(f"workdir={config.workdir!r}: not writable ({err.strerror}: {err.filename})", 2)
    except Preempted as stop:
        print(str(stop), file=sys.stderr)
        return 0
    except NonFiniteLoss as err:
        return _fail(str(err), 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
