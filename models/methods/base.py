"""What every counterfactual method shares: the input as a method sees it, one run context, the
edit a method returns, and the protocol the pipeline calls (no dispatch by ``if``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol, TypeVar

import numpy as np
import torch

from models.diffusion.components import ModelBundle
from models.diffusion.inversion import InversionCache, ProgressCallback
from models.request.params import EditParams
from models.request.report import Geometry, InversionInfo
from models.scoring.classifier import FindingClassifier

T = TypeVar("T")


class PhaseTimer:
    """Seconds per phase; on CUDA the device is synchronised so a phase is charged its own kernels."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.timings: dict[str, float] = {}
        self.cuda = device is not None and device.type == "cuda"

    def measure(self, name: str, fn: Callable[[], T]) -> T:
        start = time.perf_counter()
        result = fn()
        if self.cuda:
            torch.cuda.synchronize()
        self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 4)
        return result


@dataclass(frozen=True)
class Source:
    """The input as a method sees it: the model-size image (1, 1, S, S) in [0, 1], how it maps back
    to the input, both prompts and, for ``guided``, the anatomy to keep (input-sized, True = keep)."""

    image: torch.Tensor
    geometry: Geometry
    original_prompt: str
    edit_prompt: str
    keep: np.ndarray | None = None


@dataclass
class RunContext:
    """What one run of a method works with besides its input."""

    bundle: ModelBundle
    params: EditParams
    timer: PhaseTimer
    progress: ProgressCallback | None = None
    cache: InversionCache | None = None
    classifier: FindingClassifier | None = None


@dataclass
class Edit:
    """What a method produced: latents [reference, candidate 1..K] and what it records."""

    latents: torch.Tensor
    edit_prompts: list[str]
    self_replace: list[float | None]
    inversion: InversionInfo | None = None
    anatomy_mask: bool = False
    blend_threshold: float | None = None


class Method(Protocol):
    """A counterfactual method: the latents of the reference and of each candidate edit."""

    name: ClassVar[str]

    def run(self, source: Source, context: RunContext) -> Edit: ...
