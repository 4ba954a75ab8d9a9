"""What every counterfactual method shares: the input as a method sees it, one run context, the
edit a method returns, and the protocol the pipeline calls (no dispatch by ``if``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch

from models.diffusion.components import ModelBundle
from models.diffusion.inversion import InversionCache
from models.diffusion.packing import PackProgress, ProgressCallback
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
        return measure_all([self], name, fn)

    def charge(self, name: str, seconds: float) -> None:
        self.timings[name] = round(self.timings.get(name, 0.0) + seconds, 4)


def measure_all(timers: Sequence[PhaseTimer], name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` once and charge its seconds to every timer: the items of a pack share its phases."""
    start = time.perf_counter()
    result = fn()
    if any(timer.cuda for timer in timers):
        torch.cuda.synchronize()
    for timer in timers:
        timer.charge(name, time.perf_counter() - start)
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
    """A counterfactual method run on one image: the latents of the reference and of each candidate."""

    name: ClassVar[str]

    def run(self, source: Source, context: RunContext) -> Edit: ...


@runtime_checkable
class PackMethod(Protocol):
    """A counterfactual method that runs several images as one pack (a worker's pack of jobs).

    ``run_pack`` returns the edits of the items still in ``progress`` when it ends; an item that
    leaves (canceled, or its own input unusable) is in ``progress.left`` instead. ``pack_key``
    says which edits may share a pack."""

    name: ClassVar[str]

    def pack_key(self, params: EditParams) -> Hashable: ...

    def run_pack(
        self, sources: Sequence[Source], contexts: Sequence[RunContext], progress: PackProgress
    ) -> dict[int, Edit]: ...
