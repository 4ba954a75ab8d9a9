"""Write a file or directory aside, then rename it into place.

A reader, or a run resumed after being killed, then finds either the previous whole or the new
whole, never half of one: what checkpoints, caches and written data sets rely on.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def write_aside(path: Path, write: Callable[[Path], object], tag: str = "") -> Path:
    """Call ``write`` with a hidden sibling of ``path``, then rename that over ``path``.

    The sibling keeps the name's suffix (writers such as ``numpy.save`` add theirs otherwise).
    ``tag`` makes it private to one writer where several may write the same path at once (e.g.
    the process id); without one, a sibling left by a killed run is cleared first. A directory
    already at ``path`` is removed just before the rename.
    """
    partial = path.with_name(f".partial{tag}.{path.name}")
    _remove(partial)
    write(partial)
    if path.is_dir():
        shutil.rmtree(path)
    partial.replace(path)
    return path
