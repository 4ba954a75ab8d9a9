"""Steps, batch sizes and learning rates of the built-in model's training stages.

Kept apart from :mod:`phantoms.training` (torch, diffusers) so the CLI can list the named recipes
without importing a framework.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

TRAIN_SEEDS = range(0, 32000)
"""Training anatomies; a recipe uses the first ``images`` of them."""
STAGE_NAMES = ("vae", "decoder", "unet", "attention", "clip", "classifier")
"""The stages a recipe sizes, in training order."""


@dataclass(frozen=True)
class StageRecipe:
    steps: int
    batch: int
    lr: float


@dataclass(frozen=True)
class Recipe:
    """Steps, batch size and peak learning rate of each stage (AdamW, 100-step warm-up, cosine to 10 %)."""

    images: int = 16000
    vae: StageRecipe = StageRecipe(1000, 32, 1e-3)
    decoder: StageRecipe = StageRecipe(1500, 16, 3e-4)
    unet: StageRecipe = StageRecipe(1800, 24, 3e-4)
    attention: StageRecipe = StageRecipe(2500, 24, 1e-4)
    clip: StageRecipe = StageRecipe(900, 64, 5e-4)
    classifier: StageRecipe = StageRecipe(600, 64, 2e-3)
    attention_weight: float = 0.02
    region_images: int = 6000

    def __post_init__(self) -> None:
        if not 0 < self.images <= len(TRAIN_SEEDS):
            raise ValueError(f"images must be 1 to {len(TRAIN_SEEDS)} (the training anatomies), got {self.images}")

    def scaled(self, factor: float, batch: int | None = None) -> Recipe:
        """Every stage's steps times ``factor`` (at least 10), optionally with one batch size (quick checks)."""
        stages = {
            name: replace(
                getattr(self, name),
                steps=max(10, int(getattr(self, name).steps * factor)),
                batch=batch or getattr(self, name).batch,
            )
            for name in STAGE_NAMES
        }
        return replace(self, **stages)


RECIPES: dict[str, Recipe] = {
    "cpu": Recipe(),
    "h100": Recipe(
        images=32000,
        vae=StageRecipe(3000, 64, 1e-3),
        decoder=StageRecipe(3000, 64, 3e-4),
        unet=StageRecipe(5000, 64, 3e-4),
        attention=StageRecipe(2000, 32, 1e-4),
        clip=StageRecipe(2000, 64, 5e-4),
        classifier=StageRecipe(1200, 64, 2e-3),
        region_images=12000,
    ),
}
"""Named recipes: ``cpu`` fits two cores in about 2 h; ``h100`` was sized as about 14 minutes of one H100
before the decoder stage was added (not yet run)."""
