"""Where the engine finds a model when none is configured.

Until a trained built-in model ships, the default is the tiny random-weight model, built once
offline into the PRISM home directory: it exercises the whole pipeline but edits nothing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def prism_home() -> Path:
    return Path(os.environ.get("PRISM_HOME", Path.home() / ".cache" / "prism"))


def builtin_model_dir() -> Path:
    """The built-in model directory, created on first use (no network involved)."""
    from models.tiny import make_tiny_model

    target = prism_home() / "builtin-tiny"
    if not (target / "model_index.json").exists():
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        make_tiny_model(tmp)
        try:
            tmp.rename(target)
        except OSError:
            shutil.rmtree(tmp)
    return target
