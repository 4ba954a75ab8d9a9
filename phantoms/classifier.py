"""A small CNN that predicts the three phantom findings; used for flip rates (CPG-style measures)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from phantoms.render import FINDINGS


class FindingClassifier(nn.Module):
    """(N, 1, 128, 128) in [0, 1] -> (N, 3) logits for cardiomegaly, pleural effusion, devices."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for out in (width, 2 * width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.GroupNorm(4, out), nn.SiLU(), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, len(FINDINGS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x * 2 - 1).mean((2, 3)))

    def save(self, path: Path) -> None:
        save_file(self.state_dict(), str(path))

    @classmethod
    def load(cls, path: Path) -> FindingClassifier:
        model = cls()
        model.load_state_dict(load_file(str(path)))
        return model.eval()
