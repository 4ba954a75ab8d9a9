"""Editing parameters with PRISM's defaults (DESIGN.md section 2). Torch-free."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

from models.errors import InvalidInput

OutputMode = Literal["residual", "decoded"]
OUTPUT_MODES: tuple[str, ...] = get_args(OutputMode)


@dataclass(frozen=True)
class NullTextSettings:
    inner_steps: int = 10
    learning_rate: float = 1e-2
    early_stop: float = 1e-5
    early_stop_growth: float = 2e-5


@dataclass(frozen=True)
class EditParams:
    """Editing parameters with PRISM's defaults (DESIGN.md section 2).

    ``output`` says how the counterfactual is formed: ``"residual"`` adds the edit's effect
    (decoded edit minus decoded reconstruction) to the input at its own resolution, where the edit
    changed the latent, so pixels the edit leaves alone keep the input's exact values and detail
    the VAE cannot reproduce;
    ``"decoded"`` returns the decoded edit itself, as the paper does.
    """

    steps: int = 50
    guidance_scale: float = 7.5
    cross_replace_steps: float = 0.8
    self_replace_steps: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8)
    edit_word_weight: float = 2.0
    blend_words: tuple[str, ...] | None = None
    reweight_words: tuple[str, ...] | None = None
    local_blend: bool = True
    blend_threshold: float = 0.3
    seed: int = 0
    s_clip_threshold: float = 0.1
    output: OutputMode = "residual"
    null_text: NullTextSettings = field(default_factory=NullTextSettings)

    def validate(self) -> None:
        """Range checks that need no model; each failure names its field."""
        checks: list[tuple[str, bool, str]] = [
            ("steps", 1 <= self.steps <= 1000, "must be between 1 and 1000"),
            ("guidance_scale", 1.0 <= self.guidance_scale <= 30.0, "must be between 1 and 30"),
            ("cross_replace_steps", 0.0 <= self.cross_replace_steps <= 1.0, "must be between 0 and 1"),
            ("self_replace_steps", 1 <= len(self.self_replace_steps) <= 16, "needs 1 to 16 values"),
            (
                "self_replace_steps",
                all(0.0 <= v <= 1.0 for v in self.self_replace_steps),
                "values must be between 0 and 1",
            ),
            ("edit_word_weight", 0.0 <= self.edit_word_weight <= 10.0, "must be between 0 and 10"),
            ("blend_threshold", 0.0 < self.blend_threshold < 1.0, "must be between 0 and 1 (exclusive)"),
            ("output", self.output in OUTPUT_MODES, f"must be one of {', '.join(OUTPUT_MODES)}"),
            ("null_text_inner_steps", 0 <= self.null_text.inner_steps <= 100, "must be between 0 and 100"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise InvalidInput(name, message)

    def to_dict(self) -> dict:
        return asdict(self)
