"""Who may do what in this app: the hosting mode, each caller's workspace, admin-only and training-only actions.

`Hosting` is built once in `build_ui` from the settings and handed to every tab builder. Handlers ask it for the
caller's workspace (`hosting.workspace(request)`) and call `require_admin` / `require_training` before actions that
affect everyone. The mode itself is decided in one place, `AppSettings.hosting_mode`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from app.backends import ServerBackends
from app.queue_control import QueueControl
from app.settings import AppSettings, HostingMode
from app.uploads import UploadLimits, find_dataset, list_datasets
from app.workspace import Workspace, Workspaces

logger = logging.getLogger(__name__)
EXPIRY_INTERVAL_S = 3600.0  # how often idle anonymous workspaces are looked for


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
    workspace_limit_bytes: int = 0  # `shared`: most bytes one workspace may hold (0: no limit)
    anonymous_days: float = 0.0  # `shared`: anonymous workspaces idle this long are deleted (0: kept)

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
            workspace_limit_bytes=settings.workspace_limit_bytes if mode.shared else 0,
            anonymous_days=settings.anonymous_days if mode.shared else 0.0,
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

    def dataset_names(self, request: gr.Request | None) -> list[str]:
        """The caller's uploaded datasets, newest first (what the dataset dropdowns offer)."""
        return list(list_datasets(self.workspace(request).uploads))

    def dataset(self, request: gr.Request | None, name) -> Path:
        """The folder of the caller's uploaded dataset `name`, resolved inside their workspace; ValueError (an
        UploadError naming the choices) for anything else."""
        workspace = self.workspace(request)
        return workspace.resolve(find_dataset(workspace.uploads, name))

    def room_bytes(self, workspace: Workspace) -> int | None:
        """What `workspace` has left under its quota (None: no quota, as in personal mode)."""
        if not self.workspace_limit_bytes or not workspace.confined:
            return None
        return self.workspace_limit_bytes - workspace.used_bytes()

    def upload_limits_for(self, workspace: Workspace) -> UploadLimits:
        """The upload caps for one caller: the server's, and no more than their workspace has room for."""
        return dataclasses.replace(self.upload_limits, room_bytes=self.room_bytes(workspace))

    def require_room(self, workspace: Workspace, action: str) -> None:
        """Refuse `action` (it writes into the workspace) when the workspace is at its quota."""
        room = self.room_bytes(workspace)
        if room is not None and room <= 0:
            limit = self.workspace_limit_bytes / 1024**3
            raise gr.Error(
                f"Your workspace is full (it holds {(self.workspace_limit_bytes - room) / 1024**3:.2f} GiB; the "
                f"limit is {limit:.2f} GiB), so {action} cannot start: delete images (Gallery) or datasets "
                "(Recaption tab) first.",
                title="Workspace full",
            )

    def start_expiring_anonymous_workspaces(self, interval_s: float = EXPIRY_INTERVAL_S) -> threading.Thread | None:
        """In shared mode with `anonymous_days`, delete idle anonymous workspaces now and then every `interval_s`,
        in a daemon thread (returned; None when there is nothing to expire)."""
        if not self.shared or not self.anonymous_days:
            return None

        def run() -> None:
            while True:
                try:
                    self.workspaces.expire_anonymous(self.anonymous_days)
                except OSError as error:  # a disk problem must not end the server; the next round tries again
                    logger.warning("Could not expire anonymous workspaces: %s", error)
                time.sleep(interval_s)

        thread = threading.Thread(target=run, name="lens-workspace-expiry", daemon=True)
        thread.start()
        return thread

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
