"""Train a LoRA, LoKr or the full Lens denoiser on captioned images.

    python -m training.train --config run.yaml [--model PATH] [--data FOLDER] [--output-dir DIR]
                             [--max-steps N] [--set key=value ...] [--resume latest|CHECKPOINT]

Without --config the defaults plus the flags are a complete run. Several GPUs: `accelerate launch -m training.train
...`. SIGTERM / SIGINT stop the run after the current step with a checkpoint, so `--resume latest` continues it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from .config import build_config, config_help, load_config_file, parse_override

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (see training/configs/)")
    parser.add_argument("--model", help="model.path: Hub id or local folder of the base")
    parser.add_argument("--data", help="data.path: image folder, webdataset .tar or .parquet")
    parser.add_argument("--output-dir", help="output_dir: the run folder")
    parser.add_argument("--max-steps", type=int, help="loop.max_steps")
    parser.add_argument("--preset", help="card preset: 12gb, 16gb, 24gb or 48gb")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set optimizer.learning_rate=2e-4 (repeatable)",
    )
    parser.add_argument("--resume", help="'latest' or a checkpoint folder")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its help and exit")
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace):
    """The run's config from the file, the named flags and the --set overrides (in that order of precedence)."""
    file_values = load_config_file(args.config) if args.config else {}
    overrides = dict(parse_override(item) for item in args.overrides)
    for flag, key in (
        ("model", "model.path"),
        ("data", "data.path"),
        ("output_dir", "output_dir"),
        ("max_steps", "loop.max_steps"),
        ("preset", "preset"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides[key] = value
    return build_config(file_values, overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.help_config:
        sys.stdout.write(config_help() + "\n")
        return 0
    from .progress import ProgressLog
    from .trainer import LensTrainer

    try:
        config = resolve(args)
    except ValueError as error:
        logger.error("%s", error)
        return 2
    trainer = LensTrainer(config)

    def request_stop(signum, _frame):
        logger.warning("Signal %d: stopping after the current step (a checkpoint will be written).", signum)
        trainer.stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        outputs = trainer.run(resume=args.resume)
    except (ValueError, OSError, FloatingPointError) as error:
        logger.error("%s", error)
        ProgressLog(config.output_dir, config.loop.max_steps, tensorboard=False).event("error", message=str(error))
        return 1
    for kind, path in outputs.items():
        logger.info("%s: %s", kind, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
