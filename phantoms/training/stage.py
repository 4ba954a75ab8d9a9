"""One resumable training loop, shared by every stage trained here."""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import models.weights.offline  # noqa: F401  (before diffusers/transformers)
from models.atomic import write_aside
from models.training.stopping import StopSwitch
from phantoms.recipe import StageRecipe

log = logging.getLogger("prism.train")


class Stage:
    """A resumable training loop: ``step_fn(step)`` returns the loss; checkpoints every ``every``.

    A checkpoint holds the modules, the optimiser and the random state the steps draw from
    (``rng``, the stage's batches and captions, and torch's generators, for noise and latent
    samples), so a resumed stage redoes the steps after it exactly as an uninterrupted one did.
    A request to ``stop`` lets the step under way finish (each ``step_fn`` updates the weights
    itself, so it is never cut short), then checkpoints and raises KeyboardInterrupt: no step is lost.
    """

    def __init__(
        self,
        name: str,
        work: Path,
        modules: dict[str, torch.nn.Module],
        optimizer,
        recipe: StageRecipe,
        rng: np.random.Generator,
        stop: StopSwitch | None = None,
    ) -> None:
        self.name, self.modules, self.optimizer, self.recipe, self.rng = name, modules, optimizer, recipe, rng
        self.stop = stop or StopSwitch()
        self.path = work / f"{name}.ckpt"
        self.start = 0
        self.smoothed: float | None = None
        if self.path.exists():
            state = torch.load(self.path, weights_only=True, map_location="cpu")
            for key, module in modules.items():
                module.load_state_dict(state[key])
            optimizer.load_state_dict(state["optimizer"])
            self.start, self.smoothed = state["step"], state.get("smoothed_loss")
            if "numpy_rng" in state:
                rng.bit_generator.state = state["numpy_rng"]
                torch.set_rng_state(state["torch_rng"])
                if state["cuda_rng"] and torch.cuda.is_available():
                    torch.cuda.set_rng_state_all(state["cuda_rng"])
            log.info("%s: resuming at step %d", name, self.start)

    def _random_state(self) -> dict:
        return {
            "numpy_rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def run(self, step_fn: Callable[[int], float], every: int = 200) -> float:
        """Train to the recipe's step count; returns the final loss (exponential moving average)."""
        steps, lr = self.recipe.steps, self.recipe.lr
        t0 = time.perf_counter()
        for step in range(self.start, steps):
            if self.stop.asked:
                self._save(step)
                log.info("%s: stopped at step %d/%d", self.name, step, steps)
                raise KeyboardInterrupt
            warm = min(1.0, (step + 1) / 100)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
            loss = step_fn(step)
            self.smoothed = loss if self.smoothed is None else 0.98 * self.smoothed + 0.02 * loss
            if (step + 1) % every == 0 or step + 1 == steps:
                self._save(step + 1)
                rate = (time.perf_counter() - t0) / (step + 1 - self.start)
                log.info("%s: step %d/%d loss %.5f (%.2f s/step)", self.name, step + 1, steps, self.smoothed, rate)
        return float(self.smoothed)

    def _save(self, step: int) -> None:
        state = {k: m.state_dict() for k, m in self.modules.items()}
        extra = {"optimizer": self.optimizer.state_dict(), "step": step, "smoothed_loss": self.smoothed}
        write_aside(self.path, functools.partial(torch.save, {**state, **extra, **self._random_state()}))
