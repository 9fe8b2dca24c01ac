"""Command line: ``python -m training.recaption INPUT [INPUT ...] [options]``.

Parse args, resolve the config, build, run. Every option is a ``RecaptionConfig`` field (same name, same help);
``--config FILE`` reads a JSON config (written by the UI) that command-line options then override.
Exit codes: 0 every image captioned, 1 some images failed or the backend stopped, 2 bad arguments, 130 stopped.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import types
import typing
from dataclasses import fields
from pathlib import Path

from ..secret_scrubber import install_log_scrubber
from ..typed_config import field_default
from .config import RecaptionConfig

logger = logging.getLogger("training.recaption")


def build_parser() -> argparse.ArgumentParser:
    """One option per config field, named like the field (``max_retries`` -> ``--max-retries``). Values stay text here:
    the config mechanism converts and checks them, so the command line, JSON files and the UI share one set of rules."""
    # allow_abbrev=False: otherwise '--api-key sk-...' would silently be taken as '--api-key-env sk-...'.
    parser = argparse.ArgumentParser(
        prog="python -m training.recaption",
        description="Turn a dataset's alt-text into dense Lens-style captions.",
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="JSON file of config fields; options given here override it.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging (retries, backoff).")
    for item in fields(RecaptionConfig):
        help_text = item.metadata["help"]
        if item.metadata.get("cli") == "positional":
            parser.add_argument(item.name, nargs="*", default=argparse.SUPPRESS, help=help_text)
            continue
        flag = "--" + item.name.replace("_", "-")
        default = field_default(item)
        if isinstance(default, bool):
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"{help_text} (default: {default})",
            )
            continue
        nargs = "+" if isinstance(default, list) else None
        parser.add_argument(flag, nargs=nargs, default=argparse.SUPPRESS, help=f"{help_text} (default: {default})")
    return parser


def resolve_config(argv: list[str]) -> tuple[RecaptionConfig, bool]:
    """argv -> a validated config (``--config`` file first, then options) and the verbose flag."""
    for argument in argv:
        if argument.split("=")[0] in ("--api-key", "--key", "--openai-api-key"):
            # Never echo the value: it would land in logs and the UI's process output.
            raise ValueError(
                "API keys are not accepted on the command line; put the key in an environment variable "
                "and name it with --api-key-env (default OPENAI_API_KEY)"
            )
    arguments = vars(build_parser().parse_args(argv))
    config_file = arguments.pop("config")
    verbose = arguments.pop("verbose")
    values = RecaptionConfig.from_json_file(config_file).to_dict() if config_file else {}
    values.update(arguments)
    return RecaptionConfig.from_dict(values), verbose


def _stop_on_sigterm(_signal: int, _frame: types.FrameType | None) -> typing.NoReturn:
    # The UI stops a run with SIGTERM: turn it into KeyboardInterrupt so the runner records 'stopped'.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    install_log_scrubber()  # the API key, once read, never reaches the log, whatever a server echoes
    try:
        config, verbose = resolve_config(argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)  # noqa: T201 - the command line's own error channel
        return 2
    if verbose:
        logging.getLogger("training").setLevel(logging.DEBUG)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    from .runner import run  # imported after parsing so --help stays fast

    try:
        summary = run(config)
    except ValueError as error:
        logger.error("%s", error)
        return 2
    except KeyboardInterrupt:
        logger.warning("stopped; run the same command again to resume")
        sys.stderr.flush()
        os._exit(130)  # do not wait for in-flight HTTP threads: their images are simply redone on resume
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
