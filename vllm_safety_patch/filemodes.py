"""Modes of the files vsp writes for others to read: checkpoints, adapters, deltas.

``safetensors.save_file`` (and so transformers' ``save_pretrained``) and ``mkstemp`` create
files 0600. The Docker images prepare the model as root and serve it as uid 10001, and a
shared cache or deltas folder has other readers too, so every such file gets the mode a
plain ``open()`` would have given it: 0666 less the process umask.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def current_umask() -> int:
    # The only portable way to read the umask is to set it; put it straight back.
    umask = os.umask(0)
    os.umask(umask)
    return umask


def share_files(paths: Iterable[str | Path]) -> None:
    """Give each file the mode ``open()`` would (0666 & ~umask); links are left alone."""
    mode = 0o666 & ~current_umask()
    for path in paths:
        if not os.path.islink(path):
            os.chmod(path, mode)


def share_tree(folder: str | Path) -> None:
    """:func:`share_files` on every file under ``folder`` (a folder vsp wrote whole)."""
    share_files(path for path in Path(folder).rglob("*") if path.is_file())
