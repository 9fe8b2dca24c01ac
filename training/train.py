"""Train a LoRA, LoKr or the full Lens denoiser on captioned images.

    python -m training.train --config run.yaml [--model PATH] [--data FOLDER] [--output-dir DIR]
                             [--max-steps N] [--set key=value ...] [--resume latest|CHECKPOINT]

Without --config the defaults plus the flags are a complete run. The run folder gets the resolved `config.yaml`, so
`python -m training.train --config <run>/config.yaml --resume latest` continues a run. Several GPUs:
`accelerate launch -m training.train ...`. SIGTERM / Ctrl-C stop the run at the next step with a checkpoint (a second
Ctrl-C stops at once). Exit codes: 0 done, 1 the run failed, 2 bad configuration, 130 stopped.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from .config import build_config, config_help, load_config_file, parse_override
from .secret_scrubber import install_log_scrubber

logger = logging.getLogger(__name__)
EXIT_FAILED, EXIT_BAD_CONFIG, EXIT_STOPPED = 1, 2, 130


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (see training/configs/)")
    parser.add_argument("--model", help="model.path: Hub id or local folder of the base")
    parser.add_argument("--data", help="data.path: image folder, webdataset .tar or .parquet")
    parser.add_argument("--output-dir", help="output_dir: the run folder")
    parser.add_argument("--max-steps", type=int, help="loop.max_steps")
    parser.add_argument("--preset", help="preset: 12gb, 16gb, 24gb, 48gb (card sizes) or cpu (a CPU demo)")
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
    """The run's config from the file, the named flags and the --set overrides (in that order of precedence).
    `--resume` with `--output-dir` and no `--config` reads the run's own config.yaml."""
    config_file = args.config
    if config_file is None and args.resume and args.output_dir and (Path(args.output_dir) / "config.yaml").is_file():
        config_file = Path(args.output_dir) / "config.yaml"
    file_values = load_config_file(config_file) if config_file else {}
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


def _record_error(output_dir: str, message: str) -> None:
    """Put the error in the run's progress (what the Train tab shows); an unwritable folder is already in the log."""
    from .progress import PROGRESS_FILE, ProgressLog

    try:
        with ProgressLog(Path(output_dir) / PROGRESS_FILE) as log:
            log.write("error", message=message)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_scrubber()
    if args.help_config:
        sys.stdout.write(config_help() + "\n")
        return 0
    try:
        config = resolve(args)
    except ValueError as error:
        logger.error("%s", error)
        return EXIT_BAD_CONFIG
    from .trainer import LensTrainer

    trainer = LensTrainer(config)

    def request_stop(signum, _frame):
        if trainer.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        logger.warning("Signal %d: stopping at the next step (a checkpoint is written).", signum)
        trainer.request_stop()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        outputs = trainer.run(resume=args.resume)
    except KeyboardInterrupt:
        logger.warning("Interrupted: stopped without a checkpoint; --resume latest continues from the last one.")
        _record_error(config.output_dir, "interrupted")
        return EXIT_STOPPED
    except (ValueError, OSError, FloatingPointError) as error:
        logger.error("%s", error)
        _record_error(config.output_dir, str(error))
        return EXIT_FAILED
    if trainer.stopped:
        return EXIT_STOPPED
    for kind, path in outputs.items():
        logger.info("%s: %s", kind, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
