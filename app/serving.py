"""Hand a workspace file to the page without exposing the workspace.

Gradio serves a returned file only from its own cache folder or from `allowed_paths`, and anything in
`allowed_paths` can be fetched by anyone who can guess its path. So the app never lists the output folder there in
`shared` mode: each file an event returns is first linked (or copied, across file systems) under an unguessable name
into Gradio's cache folder, which `delete_cache` empties after an hour. This also works wherever `--output-dir`
lives, inside the working directory or not.
"""

from __future__ import annotations

import os
import secrets
import shutil
import threading
from collections import OrderedDict
from pathlib import Path

MAX_REMEMBERED = 10_000  # served files remembered, so a gallery refresh does not make new copies
_served: OrderedDict[tuple, str] = OrderedDict()
_lock = threading.Lock()


def served_copy(path: str | Path) -> str:
    """A link to (or copy of) `path` in Gradio's cache folder, same file name in a random folder; the same one again
    while the file is unchanged and the served one still exists."""
    from gradio.utils import get_upload_folder

    source = Path(path)
    status = source.stat()
    key = (str(source.resolve()), status.st_mtime_ns, status.st_size)
    with _lock:
        known = _served.get(key)
        if known is not None and os.path.exists(known):
            _served.move_to_end(key)
            return known
    folder = Path(get_upload_folder()) / f"lens-{secrets.token_hex(16)}"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / source.name
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(source, target)
    with _lock:
        _served[key] = str(target)
        while len(_served) > MAX_REMEMBERED:
            _served.popitem(last=False)
    return str(target)
