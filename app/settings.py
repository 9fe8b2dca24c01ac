"""Command line of `python app.py` and the typed settings it produces (no Gradio import here)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from lens_core.memory import MEMORY_MODES
from lens_core.presets import VARIANTS
from lens_core.rewriter import RewriterSettings

DEFAULT_MODEL = VARIANTS["Lens-Turbo"].repo_ids[0]
AUTH_ENV = "LENS_AUTH"  # "user:password[,user:password...]": the way to pass secrets without the command line


@dataclass
class AppSettings:
    """Everything the app needs from its command line."""

    model: str = DEFAULT_MODEL  # Hub id (mirrors tried), local folder, or "tiny"
    memory_mode: str = "auto"
    output_dir: Path = Path("outputs")
    host: str | None = None  # None: Gradio's default (GRADIO_SERVER_NAME, else 127.0.0.1)
    port: int | None = None  # None: Gradio's default (GRADIO_SERVER_PORT, else 7860)
    share: bool = False
    auth: list[tuple[str, str]] = field(default_factory=list)
    queue_size: int = 32  # jobs waiting beyond this are refused with "queue is full"
    local_files_only: bool = False
    rewriter: RewriterSettings = field(default_factory=RewriterSettings)


def parse_credentials(text: str, origin: str) -> list[tuple[str, str]]:
    """`user:password` pairs separated by commas or newlines; `origin` names where they came from in errors."""
    pairs = []
    for item in text.replace("\n", ",").split(","):
        item = item.strip()
        if not item or item.startswith("#"):
            continue
        user, sep, password = item.partition(":")
        if not sep or not user.strip() or not password:
            # Never echo the item: it may be a password.
            raise ValueError(f"{origin}: each credential must look like user:password (entry {len(pairs) + 1}).")
        pairs.append((user.strip(), password))
    return pairs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python app.py", description="Lens studio: the Gradio app for Lens.")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="Hub repo id (mirrors are tried), local folder, or "
        f"'tiny' (random demo model built on the fly). Default: {DEFAULT_MODEL}.",
    )
    parser.add_argument("--memory-mode", default="auto", choices=["auto", *MEMORY_MODES], help="Where the model lives.")
    parser.add_argument("--output-dir", default="outputs", help="Images (images/), LoRAs (loras/), training runs.")
    parser.add_argument("--host", default=None, help="Interface to listen on (0.0.0.0 for the network).")
    parser.add_argument("--port", type=int, default=None, help="Port (default 7860).")
    parser.add_argument("--share", action="store_true", help="Also open a public gradio.live link.")
    parser.add_argument("--auth", default=None, help=f"user:password (comma-separated for several); or set {AUTH_ENV}.")
    parser.add_argument("--auth-file", default=None, help="A file with one user:password per line.")
    parser.add_argument("--queue-size", type=int, default=32, help="Most jobs waiting at once (default 32).")
    parser.add_argument("--local-files-only", action="store_true", help="Never contact the Hub.")
    parser.add_argument("--rewriter-url", default=RewriterSettings.base_url, help="OpenAI-compatible API root.")
    parser.add_argument(
        "--rewriter-model", default=RewriterSettings.model, help="Model name for the rewriter endpoint."
    )
    parser.add_argument(
        "--rewriter-key-env",
        default=RewriterSettings.api_key_env,
        help="Environment variable holding the rewriter's API key ('' for none).",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> AppSettings:
    """Parse the command line into `AppSettings`; invalid values end the program with a message naming them."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        auth = parse_credentials(args.auth, "--auth") if args.auth else []
        if args.auth_file:
            auth += parse_credentials(Path(args.auth_file).read_text(), f"--auth-file {args.auth_file}")
        if os.environ.get(AUTH_ENV):
            auth += parse_credentials(os.environ[AUTH_ENV], AUTH_ENV)
        if args.queue_size < 1:
            raise ValueError(f"--queue-size must be at least 1, got {args.queue_size}.")
        if args.port is not None and not 1 <= args.port <= 65535:
            raise ValueError(f"--port must be from 1 to 65535, got {args.port}.")
        rewriter = RewriterSettings(
            base_url=args.rewriter_url, model=args.rewriter_model, api_key_env=args.rewriter_key_env
        )
    except (OSError, ValueError) as error:
        parser.error(str(error))
    return AppSettings(
        model=args.model,
        memory_mode=args.memory_mode,
        output_dir=Path(args.output_dir),
        host=args.host,
        port=args.port,
        share=args.share,
        auth=auth,
        queue_size=args.queue_size,
        local_files_only=args.local_files_only,
        rewriter=rewriter,
    )
