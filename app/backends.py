"""Server-configured endpoints for recaptioning and the prompt rewriter (no Gradio import here).

On a shared server a visitor picks a backend by *name*; its URL, model and the name of the environment variable that
holds its key come only from the server's own flags or `--backends FILE`, so no visitor can point the server's keys
at a host of their choosing. The file is YAML:

    rewriter:                 # the prompt rewriter of the Generate tab
      openai:                 # the name visitors pick
        base_url: https://api.openai.com/v1
        model: gpt-4.1-mini
        api_key_env: OPENAI_API_KEY
      local: {backend: local} # the checkpoint's own GPT-OSS (about 13 GB more memory)
    recaption:                # the Recaption tab
      gpt-4.1-mini: {base_url: https://api.openai.com/v1, model: gpt-4.1-mini, api_key_env: OPENAI_API_KEY}
      qwen-vl: {backend: local, model: /models/Qwen2.5-VL-7B-Instruct}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lens_core.rewriter import RewriterSettings

BACKEND_KINDS = ("openai", "local")
DEMO_RECAPTION_BACKEND = "demo"  # the tiny random offline VLM: always offered, costs nothing
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEYS = {"backend", "base_url", "model", "api_key_env"}


@dataclass(frozen=True)
class Backend:
    """One named endpoint: an OpenAI-compatible server (`openai`) or a local model (`local`)."""

    name: str
    kind: str = "openai"
    base_url: str = ""
    model: str = ""
    api_key_env: str = ""  # the NAME of the environment variable holding the key ("" for none)

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"Backend name {self.name!r} must be 1-64 letters, digits, spaces, '.', '_' or '-'.")
        if self.kind not in BACKEND_KINDS:
            raise ValueError(f"Backend {self.name!r}: backend must be one of {list(BACKEND_KINDS)}, got {self.kind!r}.")
        if self.kind == "openai" and not re.match(r"^https?://[^\s/]+", self.base_url):
            raise ValueError(f"Backend {self.name!r}: base_url must start with http:// or https://.")
        if self.api_key_env and not _ENV_NAME.fullmatch(self.api_key_env):
            raise ValueError(f"Backend {self.name!r}: api_key_env must be an environment variable NAME.")

    def describe(self) -> str:
        """What the page shows: the model and the host, never the key."""
        if self.kind == "local":
            return f"{self.name}: local model {Path(self.model).name or 'of the checkpoint'}"
        return f"{self.name}: {self.model} at {self.base_url}"


@dataclass
class ServerBackends:
    """The endpoints this server offers, by name, for each use."""

    rewriter: dict[str, Backend] = field(default_factory=dict)
    recaption: dict[str, Backend] = field(default_factory=dict)

    def pick(self, use: str, name) -> Backend:
        """The backend called `name` for `use` ("rewriter" or "recaption"); ValueError lists the choices."""
        offered = getattr(self, use)
        if not isinstance(name, str) or name not in offered:
            shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
            raise ValueError(
                f"Unknown {use} backend {shown}; this server offers {sorted(offered) or 'none'} "
                "(endpoints are set by the server's --backends file, not by visitors)."
            )
        return offered[name]

    def rewriter_settings(self, name) -> RewriterSettings:
        """`RewriterSettings` for the rewriter backend called `name`."""
        backend = self.pick("rewriter", name)
        if backend.kind == "local":
            return RewriterSettings(backend="local")
        return RewriterSettings(
            backend="openai", base_url=backend.base_url, model=backend.model, api_key_env=backend.api_key_env
        )


def _section(values, use: str, origin: str) -> dict[str, Backend]:
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{origin}: '{use}' must map backend names to settings, got {type(values).__name__}.")
    backends = {}
    for name, settings in values.items():
        if not isinstance(settings, dict):
            raise ValueError(f"{origin}: {use}.{name} must be a mapping of {sorted(_KEYS)}.")
        unknown = sorted(set(settings) - _KEYS)
        if unknown:
            raise ValueError(f"{origin}: {use}.{name} has unknown key(s) {unknown}; allowed: {sorted(_KEYS)}.")
        kind = settings.get("backend", "openai")
        if use == "recaption" and kind == "local" and not settings.get("model"):
            raise ValueError(f"{origin}: recaption.{name} is local and needs model: (a model folder or Hub id).")
        backends[str(name)] = Backend(
            name=str(name),
            kind=kind,
            base_url=str(settings.get("base_url", "")),
            model=str(settings.get("model", "")),
            api_key_env=str(settings.get("api_key_env", "")),
        )
    return backends


def load_backends(path: Path | None, rewriter_flags: RewriterSettings, shared: bool) -> ServerBackends:
    """The backends of `path` (YAML, see the module docstring), plus the defaults: the rewriter endpoint of the
    --rewriter-* flags as `openai` unless the file has a `rewriter` section, the checkpoint's GPT-OSS as `local`
    (personal mode only: it needs about 13 GB more), and the offline `demo` recaption model."""
    values = {}
    if path is not None:
        origin = f"--backends {path}"
        try:
            values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{origin}: not valid YAML ({error}).") from None
        if not isinstance(values, dict) or set(values) - {"rewriter", "recaption"}:
            raise ValueError(f"{origin}: the file holds two sections, 'rewriter' and 'recaption'.")
    rewriter = _section(values.get("rewriter"), "rewriter", f"--backends {path}")
    if "rewriter" not in values:
        rewriter["openai"] = Backend(
            "openai", "openai", rewriter_flags.base_url, rewriter_flags.model, rewriter_flags.api_key_env
        )
        if not shared:
            rewriter["local"] = Backend("local", "local")
    recaption = {DEMO_RECAPTION_BACKEND: Backend(DEMO_RECAPTION_BACKEND, "local")}
    recaption.update(_section(values.get("recaption"), "recaption", f"--backends {path}"))
    return ServerBackends(rewriter=rewriter, recaption=recaption)
