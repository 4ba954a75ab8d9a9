"""The files a model directory must hold, checked without importing a framework.

A worker or ``prism edit`` pointed at a wrong directory says which file is missing within a
second, instead of after the half minute torch and diffusers take to import (or to a pod's
readiness probe, when the orchestrator restarts it over and over).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models.request.errors import ModelLoadError
from models.weights.builtin import builtin_model_dir

REQUIRED_FILES = {
    "unet": ("config.json", "diffusion_pytorch_model.safetensors"),
    "vae": ("config.json", "diffusion_pytorch_model.safetensors"),
    "text_encoder": ("config.json", "model.safetensors"),
}
"""Each diffusers component directory and the files it is loaded from."""
CLIP_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


@dataclass(frozen=True)
class ModelLayout:
    """Where a checked model's parts are: the diffusion directory and the CLIP scorer's."""

    model_dir: Path
    clip_dir: Path


def require(path: Path, what: str) -> Path:
    if not path.exists():
        raise ModelLoadError(f"missing {what}: {path}")
    return path


def _require_tokenizer(directory: Path) -> None:
    """A tokenizer is either ``tokenizer.json`` or the ``vocab.json`` + ``merges.txt`` pair."""
    if (directory / "tokenizer.json").exists():
        return
    for name in ("vocab.json", "merges.txt"):
        require(directory / name, "tokenizer file (or tokenizer.json)")


def locate_model(model_dir: str | Path | None, clip_dir: str | Path | None = None) -> ModelLayout:
    """The model's directories once every file it needs is there (``None``: the built-in model);
    raises :class:`ModelLoadError` naming the first missing directory or file."""
    model_dir = builtin_model_dir() if model_dir is None else Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory not found: {model_dir}")
    for sub, names in REQUIRED_FILES.items():
        for name in names:
            require(model_dir / sub / name, f"{sub} file")
    clip_path = Path(clip_dir) if clip_dir else model_dir / "clip"
    if not clip_path.is_dir():
        raise ModelLoadError(f"CLIP model directory not found: {clip_path} (set --clip-model / PRISM_CLIP_MODEL)")
    for name in CLIP_FILES:
        require(clip_path / name, "CLIP file")
    _require_tokenizer(model_dir / "tokenizer")
    _require_tokenizer(clip_path)
    return ModelLayout(model_dir, clip_path)
