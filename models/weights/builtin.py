"""The built-in model: trained on synthetic phantoms, shipped in the repository.

Used by the service and ``prism edit`` when no model is configured. It edits phantoms, not real
radiographs: see ``models/assets/builtin/MODEL_CARD.md``.
"""

from __future__ import annotations

from pathlib import Path

from models.request.errors import ModelLoadError

BUILTIN_DIR = Path(__file__).parents[1] / "assets" / "builtin"


def builtin_model_dir() -> Path:
    if not (BUILTIN_DIR / "unet" / "config.json").exists():
        raise ModelLoadError(f"built-in model missing at {BUILTIN_DIR}: run `prism train-builtin`")
    return BUILTIN_DIR
