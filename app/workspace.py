"""Workspaces: the one folder each visitor's files live in, and the check that every path stays inside it.

`personal` mode has one workspace, the output folder itself (today's layout: images/, uploads/, recaption/,
training/), and the person at the machine may name any folder. `shared` mode gives each visitor
`OUTPUT_DIR/users/<id>/` with the same layout: `<id>` comes from the login name, or for anonymous visitors from a
random id the browser keeps (signed with a server secret, so nobody can claim another visitor's id). Every path is
resolved (`realpath`, so symlinks too) and must lie inside the caller's workspace. No Gradio import here.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import shutil
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

USERS_SUBDIR = "users"
SECRET_FILE = ".lens-workspace-secret"  # in the output folder, mode 0600: signs anonymous workspace ids
MAX_REMEMBERED_SESSIONS = 50_000  # anonymous sessions whose workspace is remembered in memory (oldest forgotten)
_ANONYMOUS_ID = re.compile(r"anon-[0-9a-f]{32}")


def strip_root(text: str, root: str | Path) -> str:
    """`text` with the workspace folder `root` left out of the paths it names (`<root>/uploads/x` -> `uploads/x`):
    what a shared server's visitor reads never shows where the server keeps their files."""
    root = str(root).rstrip(os.sep)
    return text.replace(root + os.sep, "").replace(root, ".")


def _everything_under(root: Path):
    """`os.lstat` of every folder and file under `root` (links are not followed; what vanishes meanwhile is skipped)."""
    for folder, folders, files in os.walk(root):
        for name in (*folders, *files):
            with contextlib.suppress(OSError):
                yield os.lstat(os.path.join(folder, name))


def folder_bytes(root: Path) -> int:
    """Bytes held by the files under `root`: links are not followed, and a file hard-linked twice counts once."""
    files = {(info.st_dev, info.st_ino): info.st_size for info in _everything_under(root) if stat.S_ISREG(info.st_mode)}
    return sum(files.values())


def newest_change(root: Path) -> float:
    """The latest modification time of `root` or anything under it (a running job keeps it recent)."""
    return max([os.lstat(root).st_mtime, *(info.st_mtime for info in _everything_under(root))])


class WorkspaceError(ValueError):
    """A path outside the caller's workspace, or a name that is not allowed; the message says which."""


@dataclass(frozen=True)
class Workspace:
    """One visitor's folder. `confined`: every path must resolve inside `root` (shared mode)."""

    root: Path  # already resolved
    owner: str  # the login name, "anonymous", or "local" (personal mode)
    confined: bool

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def uploads(self) -> Path:
        return self.root / "uploads"

    @property
    def recaption(self) -> Path:
        return self.root / "recaption"

    @property
    def training(self) -> Path:
        return self.root / "training"

    def resolve(self, path: str | Path) -> Path:
        """`path` with every symlink resolved. In a confined workspace a relative path is taken inside the workspace
        and the result must lie inside it; otherwise WorkspaceError (which never shows the server's folders)."""
        if not isinstance(path, (str, Path)) or "\0" in str(path):
            raise WorkspaceError(f"Not a path: {path!r}.")
        candidate = Path(path).expanduser()
        if self.confined and not candidate.is_absolute():
            candidate = self.root / candidate
        resolved = Path(os.path.realpath(candidate))
        if self.confined and not resolved.is_relative_to(self.root):
            raise WorkspaceError(
                f"{str(path)!r} is outside your workspace; on this shared server only your own uploads, images "
                "and runs can be used."
            )
        return resolved

    def used_bytes(self) -> int:
        """What the workspace holds on disk (its quota counts this)."""
        return folder_bytes(self.root)

    def child(self, *names: str) -> Path:
        """A path under the workspace built from plain names (no separators, no '..'), resolved and checked."""
        for name in names:
            if not isinstance(name, str) or not name or name in (".", "..") or re.search(r"[/\\\0]", name):
                raise WorkspaceError(f"{name!r} is not a plain name (no '/', '\\\\' or '..').")
        return self.resolve(self.root.joinpath(*names))


def user_folder_name(login: str) -> str:
    """A folder name for a login: readable, safe on every file system, and distinct for distinct logins (a hash
    of the exact name is appended, so 'Ann' and 'ann', or names that clean up alike, never share a folder)."""
    slug = re.sub(r"[^a-z0-9_-]+", "-", login.lower()).strip("-_")[:32] or "user"
    return f"user-{slug}-{hashlib.sha256(login.encode('utf-8')).hexdigest()[:10]}"


def _read_secret(path: Path) -> bytes:
    if path.stat().st_mode & 0o077:
        logger.warning("%s was readable by others; restricting it to mode 0600.", path)
        path.chmod(0o600)
    text = path.read_text(encoding="ascii").strip()
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise ValueError(f"{path} is not a workspace secret (64 hex digits); delete it to make a new one.")
    return bytes.fromhex(text)


def load_or_create_secret(folder: Path) -> bytes:
    """The server secret in `folder/SECRET_FILE`, created (mode 0600) on first start; kept so that a restart does
    not orphan every anonymous workspace."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SECRET_FILE
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_secret(path)
    secret = secrets.token_bytes(32)
    with os.fdopen(descriptor, "w", encoding="ascii") as stream:
        stream.write(secret.hex() + "\n")
    return secret


class Workspaces:
    """Hands each caller their workspace. Personal mode: always the output folder. Shared mode: one per login, or
    one per anonymous browser (its signed id comes back from the browser's storage on each visit)."""

    def __init__(self, output_dir: Path, shared: bool, secret: bytes | None = None):
        self.output_dir = Path(os.path.realpath(output_dir))
        self.shared = shared
        self._secret = secret if secret is not None else (load_or_create_secret(self.output_dir) if shared else b"")
        self._sessions: OrderedDict[str, str] = OrderedDict()  # session -> anonymous folder name
        self._lock = threading.Lock()

    @property
    def users_root(self) -> Path:
        return self.output_dir / USERS_SUBDIR

    def _workspace(self, folder: str, owner: str) -> Workspace:
        """The workspace named `folder`. Nothing is created here (a caller that only reads, or a client sending a
        fresh session id with every request, leaves nothing on disk); what writes into it creates the folders."""
        root = self.users_root / folder
        with contextlib.suppress(FileNotFoundError):
            os.utime(root)  # its last use: what `expire_anonymous` goes by
        return Workspace(Path(os.path.realpath(root)), owner, confined=True)

    def for_login(self, login: str) -> Workspace:
        """The workspace of a logged-in user."""
        if not self.shared:
            return self.personal()
        return self._workspace(user_folder_name(login), login)

    def personal(self) -> Workspace:
        """The single workspace of personal mode: the output folder, not confined."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        return Workspace(self.output_dir, "local", confined=False)

    def for_session(self, session: str | None) -> Workspace:
        """The anonymous workspace of a browser session (its folder appears with the first file written into it)."""
        if not self.shared:
            return self.personal()
        with self._lock:
            folder = self._sessions.get(session) if session else None
            if folder is None:
                folder = f"anon-{secrets.token_hex(16)}"
                if session:
                    self._remember(session, folder)
            else:
                self._sessions.move_to_end(session)
        return self._workspace(folder, "anonymous")

    def for_caller(self, login: str | None, session: str | None) -> Workspace:
        """The workspace of whoever made a request: their login's, else their browser session's."""
        return self.for_login(login) if login else self.for_session(session)

    def _remember(self, session: str, folder: str) -> None:
        self._sessions[session] = folder
        self._sessions.move_to_end(session)
        while len(self._sessions) > MAX_REMEMBERED_SESSIONS:
            self._sessions.popitem(last=False)

    # ---- the browser's signed id -----------------------------------------------------------------------------

    def _signature(self, folder: str) -> str:
        return hmac.new(self._secret, folder.encode("ascii"), hashlib.sha256).hexdigest()

    def browser_storage_secret(self) -> str:
        """The key the browser encrypts its stored id with (Gradio's BrowserState). It is sent to every browser, so it
        is derived from the server secret one way; being stable, a stored id survives a server restart."""
        return hmac.new(self._secret, b"browser-storage", hashlib.sha256).hexdigest()[:32]

    def token_for(self, workspace: Workspace) -> str:
        """What the browser keeps so that a reload finds the same anonymous workspace: `<id>.<signature>`."""
        folder = workspace.root.name
        return f"{folder}.{self._signature(folder)}"

    def adopt(self, session: str | None, token) -> str | None:
        """Bind `session` to the anonymous workspace named by the browser's `token` when its signature is valid
        (else keep or make a fresh one); return the token the browser should keep (None in personal mode)."""
        if not self.shared or not session:
            return None
        if isinstance(token, str) and token.count(".") == 1:
            folder, signature = token.split(".")
            if _ANONYMOUS_ID.fullmatch(folder) and hmac.compare_digest(signature, self._signature(folder)):
                with self._lock:
                    self._remember(session, folder)
                return token
        return self.token_for(self.for_session(session))

    def expire_anonymous(self, max_idle_days: float, now: float | None = None) -> list[str]:
        """Delete the anonymous workspaces nobody has used, and nothing has changed in, for `max_idle_days` (a
        login's workspace is never deleted); return their names. A returning browser then gets a fresh one."""
        if not self.shared or not self.users_root.is_dir():
            return []
        cutoff = (time.time() if now is None else now) - max_idle_days * 86400
        removed = []
        for root in sorted(self.users_root.iterdir()):
            if not _ANONYMOUS_ID.fullmatch(root.name) or root.is_symlink() or not root.is_dir():
                continue
            if root.stat().st_mtime >= cutoff or newest_change(root) >= cutoff:
                continue
            with self._lock:
                for session in [key for key, folder in self._sessions.items() if folder == root.name]:
                    del self._sessions[session]
            shutil.rmtree(root, ignore_errors=True)
            removed.append(root.name)
        if removed:
            logger.info("Removed %d anonymous workspace(s) idle for over %g days.", len(removed), max_idle_days)
        return removed

    def all_image_folders(self) -> list[Path]:
        """Every workspace's images folder (for `--shared-gallery`)."""
        if not self.shared:
            return [self.output_dir / "images"]
        return sorted(path for path in self.users_root.glob("*/images") if path.is_dir() and not path.is_symlink())
