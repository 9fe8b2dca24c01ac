"""Command line of `python app.py` and the typed settings it produces (no Gradio import here)."""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from app.backends import ServerBackends, load_backends
from lens_core.memory import MEMORY_MODES
from lens_core.presets import VARIANTS
from lens_core.rewriter import RewriterSettings

DEFAULT_MODEL = VARIANTS["Lens-Turbo"].repo_ids[0]
AUTH_ENV = "LENS_AUTH"  # "user:password[,user:password...]": the way to pass secrets without the command line
PERSONAL, SHARED = "personal", "shared"


@dataclass(frozen=True)
class HostingMode:
    """`personal`: one trusted person at this machine, who may name server folders and endpoints. `shared`: anyone
    who reaches the server is a visitor with a workspace of their own, who names no server path, URL or env var."""

    name: str
    reasons: tuple[str, ...] = ()  # what made it shared

    @property
    def shared(self) -> bool:
        return self.name == SHARED

    def banner(self) -> str:
        """One line for the page."""
        if not self.shared:
            return "Mode: **personal** (this machine only: folders and endpoints can be typed in)."
        return (
            f"Mode: **shared** ({'; '.join(self.reasons)}): each visitor has a private workspace; endpoints and "
            "folders are the server's."
        )


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
    # Hosting (see app/access.py for how the mode is decided and what `shared` changes).
    shared: bool = False  # force `shared` even on a loopback address without logins
    admins: list[str] = field(default_factory=list)  # login names that may change the model in `shared`
    allow_training: bool = False  # `shared` only: let visitors start training runs
    shared_gallery: bool = False  # `shared` only: every visitor sees every workspace's images
    train_base: str | None = None  # the Train tab's base model (None: Lens-Base, or tiny with the demo model)
    backends_file: Path | None = None  # server-configured recaption / rewriter backends (YAML)
    upload_limit_bytes: int = 2 * 1024**3  # most bytes one upload may unpack to
    workspace_limit_bytes: int = 10 * 1024**3  # `shared` only: most bytes one workspace may hold (0: no limit)
    anonymous_days: float = 14.0  # `shared` only: anonymous workspaces idle this long are deleted (0: kept)
    backends: ServerBackends | None = None  # from backends_file and the rewriter flags (parse_args fills it)

    def hosting_mode(self, environ: Mapping[str, str] | None = None) -> HostingMode:
        """The one place that decides the mode: `personal` only on a loopback address with no public link, no
        logins, not on a Space and without --shared; anything else is `shared`."""
        environ = os.environ if environ is None else environ
        reasons = []
        if self.shared:
            reasons.append("--shared")
        if self.share:
            reasons.append("--share (a public link)")
        if self.auth:
            reasons.append(f"logins (--auth, --auth-file or {AUTH_ENV})")
        host = self.host or environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
        if not is_loopback(host):
            reasons.append(f"listening on {host}")
        if environ.get("SPACE_ID"):
            reasons.append(f"Hugging Face Space {environ['SPACE_ID']}")
        return HostingMode(SHARED if reasons else PERSONAL, tuple(reasons))

    def server_backends(self, environ: Mapping[str, str] | None = None) -> ServerBackends:
        """The configured backends (parsed once by parse_args, or now from the flags and file)."""
        if self.backends is None:
            self.backends = load_backends(self.backends_file, self.rewriter, self.hosting_mode(environ).shared)
        return self.backends


def is_loopback(host: str) -> bool:
    """Whether `host` is this machine only (127.0.0.0/8, ::1 or localhost); any other name may be reachable."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
    parser.add_argument(
        "--output-dir",
        default=os.environ.get("LENS_OUTPUT_DIR", "outputs"),
        help="Images (images/), LoRAs (loras/), training runs; or set LENS_OUTPUT_DIR.",
    )
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
    hosting = parser.add_argument_group(
        "hosting",
        "The app runs `shared` (a workspace per visitor, server-configured endpoints only) whenever it is reachable "
        "by others: --share, logins, a non-loopback --host, a Hugging Face Space, or --shared.",
    )
    hosting.add_argument("--shared", action="store_true", help="Run in `shared` mode even on 127.0.0.1.")
    hosting.add_argument(
        "--admin",
        action="append",
        default=[os.environ["LENS_ADMINS"]] if os.environ.get("LENS_ADMINS") else [],
        metavar="NAME",
        help="A login that may change the model, variant checkpoint and memory mode in `shared` mode "
        "(repeat or comma-separate; or set LENS_ADMINS; default none).",
    )
    hosting.add_argument(
        "--allow-training", action="store_true", help="Let visitors of a `shared` server start training runs."
    )
    hosting.add_argument(
        "--shared-gallery", action="store_true", help="In `shared` mode, every visitor sees every visitor's images."
    )
    hosting.add_argument(
        "--train-base",
        default=os.environ.get("LENS_TRAIN_BASE") or None,
        metavar="MODEL",
        help="Base model of the Train tab's runs: Hub id, local folder or 'tiny' (default microsoft/Lens-Base, or "
        "tiny when the app runs the demo model; or set LENS_TRAIN_BASE). Visitors of a `shared` server see its "
        "name only and cannot change it.",
    )
    hosting.add_argument(
        "--backends",
        default=os.environ.get("LENS_BACKENDS") or None,
        metavar="FILE",
        help="YAML file naming the recaption and prompt-rewriter endpoints visitors may pick (see README, Hosting); "
        "or set LENS_BACKENDS.",
    )
    hosting.add_argument(
        "--upload-limit-gb",
        type=float,
        default=2.0,
        help="Most gigabytes (GiB) one upload may hold, unpacked (default 2).",
    )
    hosting.add_argument(
        "--workspace-limit-gb",
        type=float,
        default=float(os.environ.get("LENS_WORKSPACE_LIMIT_GB") or 10),
        help="In `shared` mode, most gigabytes (GiB) one visitor's workspace may hold: uploads that do not fit, "
        "and images, recaption and training runs started when it is full, are refused (0: no limit; default 10; "
        "or set LENS_WORKSPACE_LIMIT_GB).",
    )
    hosting.add_argument(
        "--anonymous-days",
        type=float,
        default=float(os.environ.get("LENS_ANONYMOUS_DAYS") or 14),
        help="In `shared` mode, delete an anonymous visitor's workspace after this many days without use (0: "
        "keep them; default 14; or set LENS_ANONYMOUS_DAYS). Login workspaces are never deleted.",
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
        admins = [name.strip() for item in args.admin for name in item.split(",") if name.strip()]
        unknown = sorted(set(admins) - {user for user, _ in auth})
        if unknown:
            raise ValueError(f"--admin {', '.join(unknown)}: not a login of --auth / --auth-file / {AUTH_ENV}.")
        if not 0 < args.upload_limit_gb <= 1024:
            raise ValueError(f"--upload-limit-gb must be above 0 and at most 1024, got {args.upload_limit_gb}.")
        if not 0 <= args.workspace_limit_gb <= 100_000:
            raise ValueError(
                f"--workspace-limit-gb must be 0 (no limit) or a positive size, got {args.workspace_limit_gb}."
            )
        if args.workspace_limit_gb and args.workspace_limit_gb < args.upload_limit_gb:
            raise ValueError(
                f"--workspace-limit-gb {args.workspace_limit_gb:g} is below --upload-limit-gb {args.upload_limit_gb:g}: "
                "a full-size upload could never fit."
            )
        if not 0 <= args.anonymous_days <= 100_000:
            raise ValueError(f"--anonymous-days must be 0 (keep) or a positive number, got {args.anonymous_days}.")
        backends_file = Path(args.backends) if args.backends else None
        if backends_file is not None and not backends_file.is_file():
            raise ValueError(f"--backends {backends_file}: no such file.")
    except (OSError, ValueError) as error:
        parser.error(str(error))
    settings = AppSettings(
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
        shared=args.shared,
        admins=admins,
        allow_training=args.allow_training,
        shared_gallery=args.shared_gallery,
        train_base=args.train_base,
        backends_file=backends_file,
        upload_limit_bytes=int(args.upload_limit_gb * 1024**3),
        workspace_limit_bytes=int(args.workspace_limit_gb * 1024**3),
        anonymous_days=args.anonymous_days,
    )
    try:
        settings.server_backends()
    except (OSError, ValueError) as error:
        parser.error(str(error))
    return settings
