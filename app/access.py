"""Who may do what in this app: the hosting mode, each caller's workspace, admin-only and training-only actions.

`Hosting` is built once in `build_ui` from the settings and handed to every tab builder. Handlers ask it for the
caller's workspace (`hosting.workspace(request)`) and call `require_admin` / `require_training` before actions that
affect everyone. The mode itself is decided in one place, `AppSettings.hosting_mode`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from app.backends import ServerBackends
from app.queue_control import QueueControl
from app.settings import AppSettings, HostingMode
from app.uploads import UploadLimits
from app.workspace import Workspace, Workspaces


@dataclass
class Hosting:
    """The server's policy for the visitors of one app."""

    mode: HostingMode
    output_dir: Path
    workspaces: Workspaces
    backends: ServerBackends
    admins: frozenset[str] = frozenset()
    allow_training: bool = False
    shared_gallery: bool = False
    upload_limits: UploadLimits = field(default_factory=UploadLimits)
    queue: QueueControl = field(default_factory=QueueControl)

    @classmethod
    def from_settings(cls, settings: AppSettings) -> Hosting:
        mode = settings.hosting_mode()
        return cls(
            mode=mode,
            output_dir=Path(settings.output_dir),
            workspaces=Workspaces(Path(settings.output_dir), shared=mode.shared),
            backends=settings.server_backends(),
            admins=frozenset(settings.admins),
            allow_training=settings.allow_training or not mode.shared,
            shared_gallery=settings.shared_gallery and mode.shared,
            upload_limits=UploadLimits(max_total_bytes=settings.upload_limit_bytes),
        )

    @classmethod
    def personal(cls, output_dir: Path, settings: AppSettings | None = None) -> Hosting:
        """Today's behaviour for one trusted person (what a tab built without a `Hosting` gets)."""
        settings = settings or AppSettings(output_dir=Path(output_dir))
        return cls(
            mode=HostingMode("personal"),
            output_dir=Path(output_dir),
            workspaces=Workspaces(Path(output_dir), shared=False),
            backends=settings.server_backends({}),
            allow_training=True,
        )

    @property
    def shared(self) -> bool:
        return self.mode.shared

    def workspace(self, request: gr.Request | None) -> Workspace:
        """The caller's workspace (personal mode: the output folder)."""
        if not self.shared:
            return self.workspaces.personal()
        login = getattr(request, "username", None) if request is not None else None
        session = getattr(request, "session_hash", None) if request is not None else None
        return self.workspaces.for_caller(login, session)

    def is_admin(self, request: gr.Request | None) -> bool:
        """Personal mode: the person at the machine. Shared mode: the logins named with --admin."""
        if not self.shared:
            return True
        login = getattr(request, "username", None) if request is not None else None
        return login is not None and login in self.admins

    def require_admin(self, request: gr.Request | None, action: str) -> None:
        """Refuse `action` (it changes the model for everyone) unless the caller is an admin."""
        if not self.is_admin(request):
            raise gr.Error(
                f"{action} changes the model for every visitor, so on this shared server only an admin may do it "
                "(the server names admins with --admin).",
                title="Admins only",
            )

    def require_training(self) -> None:
        """Refuse to start training on a shared server that has not allowed it."""
        if not self.allow_training:
            raise gr.Error(
                "Training is off on this shared server (its GPU is shared); the server can allow it with "
                "--allow-training.",
                title="Training is off",
            )
