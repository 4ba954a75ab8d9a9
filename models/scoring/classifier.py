"""Finding classifiers, for the ``guided`` method (seed 003's classifier guidance) and for
measuring edits (flip rates). Loaded from a local directory or file pair, never downloaded.

Format: ``classifier.safetensors`` (the weights) and ``classifier.json`` beside it::

    {"architecture": "small-cnn", "labels": ["Cardiomegaly", "Pleural Effusion", "Support Devices"],
     "input_size": 128, "width": 16}

``labels`` are CheXpert condition names, one per output logit (a sigmoid gives each finding's
probability). Architectures: ``small-cnn``, the built-in model's (five conv, group-norm, SiLU,
max-pool stages, then a linear head); a new one is a class registered in ``ARCHITECTURES``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from models.request.errors import ModelLoadError
from models.request.findings import Condition
from models.weights.builtin import builtin_model_dir


class ClassifierConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    architecture: str = "small-cnn"
    labels: list[Condition] = Field(min_length=1)
    input_size: int = Field(128, ge=8)
    width: int = Field(16, ge=1)


class SmallCNN(nn.Module):
    """(N, 1, S, S) intensities in [0, 1] -> (N, len(labels)) logits."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, width = 1, config.width
        for out in (width, 2 * width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.GroupNorm(4, out), nn.SiLU(), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, len(config.labels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x * 2 - 1).mean((2, 3)))


ARCHITECTURES: dict[str, type[nn.Module]] = {"small-cnn": SmallCNN}


class FindingClassifier(nn.Module):
    """A classifier with its labels; images are resized to its input size first."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        if config.architecture not in ARCHITECTURES:
            raise ModelLoadError(f"unknown classifier architecture {config.architecture!r}: {sorted(ARCHITECTURES)}")
        self.config = config
        self.net = ARCHITECTURES[config.architecture](config)

    @property
    def labels(self) -> list[str]:
        return list(self.config.labels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) in [0, 1] -> (N, labels) logits."""
        size = self.config.input_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return self.net(images)

    def save(self, weights: Path) -> None:
        save_file(self.net.state_dict(), str(weights))
        weights.with_suffix(".json").write_text(self.config.model_dump_json(indent=2))

    @classmethod
    def load(cls, weights: str | Path) -> FindingClassifier:
        """From ``weights`` (.safetensors) and the ``.json`` config beside it."""
        weights = Path(weights)
        config_path = weights.with_suffix(".json")
        for path in (weights, config_path):
            if not path.exists():
                raise ModelLoadError(f"missing classifier file: {path}")
        try:
            config = ClassifierConfig.model_validate_json(config_path.read_text())
        except (ValidationError, OSError) as exc:
            raise ModelLoadError(f"could not read {config_path}: {exc}") from exc
        model = cls(config)
        try:
            model.net.load_state_dict(load_file(str(weights)))
        except Exception as exc:  # safetensors and load_state_dict raise several types
            raise ModelLoadError(f"classifier weights {weights} do not match {config_path}: {exc}") from exc
        return model.eval().requires_grad_(False)

    def probabilities(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each label's probability for each image."""
        p = torch.sigmoid(self(images))
        return {label: p[:, k] for k, label in enumerate(self.labels)}


def configured_classifier(path: str | Path | None, model_dir: str | Path | None) -> FindingClassifier | None:
    """The classifier at ``path``, else the model directory's ``classifier.safetensors`` if it has one
    (the built-in model does), else None."""
    if path is not None:
        return FindingClassifier.load(path)
    default = Path(model_dir or builtin_model_dir()) / "classifier.safetensors"
    return FindingClassifier.load(default) if default.exists() else None


def builtin_classifier_config() -> ClassifierConfig:
    return ClassifierConfig(labels=["Cardiomegaly", "Pleural Effusion", "Support Devices"])
