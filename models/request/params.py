"""Editing parameters with PRISM's defaults and bounds, declared once (DESIGN.md section 2). Torch-free.

:class:`EditOptions` holds what a client may choose. The API form, the job request and the flags of
``prism edit`` are all built from its fields (name, type, default, bounds, description), so the
three cannot drift apart. :class:`EditParams` adds the engine settings that PRISM fixes.
Construction validates; a bad value raises pydantic's ``ValidationError`` naming the field.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from models.request.findings import parse_labels

OutputMode = Literal["residual", "decoded"]
OUTPUT_MODES: tuple[str, ...] = get_args(OutputMode)
InversionMode = Literal["null_text", "negative_prompt", "direct"]
Method = Literal["prism", "sdedit", "guided"]
BlendEditMaps = Literal["own", "replaced"]
DtypeName = Literal["float32", "float16", "bfloat16"]
"""The UNet's precision; unset means fp16 on CUDA and fp32 on CPU."""
P2P_BLEND_THRESHOLD = 0.3
"""Prompt-to-prompt's LocalBlend threshold: the one a model without its own uses."""
FileName = Literal[
    "counterfactual.png",
    "difference.png",
    "difference.npy",
    "reconstruction.png",
    "result.json",
    "counterfactual.dcm",
    "difference.dcm",
    "report.dcm",
]
"""Every file a counterfactual can have, declared once: a request chooses among them (``outputs``),
the engine writes them, the API links them."""
FILE_NAMES: tuple[str, ...] = get_args(FileName)
REPORT_FILE = "result.json"
"""Always written, listed or not: the report is the job's result."""
DICOM_FILES = ("counterfactual.dcm", "difference.dcm", "report.dcm")
"""Written for a DICOM input only."""


def split_list(value: Any) -> Any:
    """Comma-separated text, or a list of such texts, or a JSON array, as one flat list; None when
    nothing is left.

    The API (one field, repeated fields, or a JSON array as generated clients send it) and
    ``prism edit`` (one or several arguments) accept the same syntax: ``0.4,0.6``, ``0.4 0.6``
    and ``[0.4, 0.6]`` give the same list.
    """
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return value
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        return value
    items: list[Any] = []
    for entry in value:
        if isinstance(entry, str):
            items.extend(part.strip() for part in entry.split(",") if part.strip())
        else:
            items.append(entry)
    return items or None


CommaList = BeforeValidator(split_list)


def _named_files(value: Any) -> Any:
    """``outputs`` in the list syntax; an empty list is refused, not taken as the default."""
    names = split_list(value)
    if names is None:
        raise ValueError(f"name at least one of {', '.join(FILE_NAMES)}")
    return names


def _with_report(names: tuple[str, ...]) -> tuple[str, ...]:
    """The chosen files once each, in :data:`FILE_NAMES` order, with ``result.json``: so that
    ``parameters.outputs`` in the report lists what the job wrote (DICOM inputs aside)."""
    return tuple(n for n in FILE_NAMES if n in names or n == REPORT_FILE)


Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
MAX_STEPS = 999
"""DDIM over SD's 1,000 training timesteps with ``steps_offset`` 1 reaches timestep 999 at most."""


class NullTextSettings(BaseModel):
    """Null-text optimisation (Mokady et al.) as PRISM runs it: Adam, lr 1e-2 * (1 - i/100) at 50
    steps (1 - i/(2n) at n steps)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    inner_steps: Annotated[int, Field(ge=0, le=100, description="Adam steps per denoising step")] = 10
    learning_rate: Annotated[float, Field(gt=0.0)] = 1e-2
    early_stop: Annotated[float, Field(ge=0.0, description="stop the inner loop below this loss at step 0")] = 1e-5
    early_stop_growth: Annotated[float, Field(ge=0.0, description="the early-stop loss grows by this per step")] = 2e-5


class EditOptions(BaseModel):
    """What a client chooses for one counterfactual; the defaults are the PRISM paper's."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    method: Annotated[
        Method,
        Field(
            description="prism: null-text inversion + prompt-to-prompt (the paper); sdedit: noise the input to "
            "`strength` and denoise under the edit prompt (seed 004); guided: DDIM inversion, then denoising "
            "pushed by a finding classifier and an L1 term, an optional anatomy mask kept (seed 003)"
        ),
    ] = "prism"

    steps: Annotated[int, Field(ge=1, le=MAX_STEPS, description="DDIM steps of inversion and editing")] = 50
    guidance_scale: Annotated[float, Field(ge=1.0, le=30.0, description="classifier-free guidance scale")] = 7.5
    cross_replace_steps: Annotated[
        Fraction, Field(description="fraction of the steps during which cross-attention is replaced")
    ] = 0.8
    self_replace_steps: Annotated[
        tuple[Fraction, ...],
        Field(
            min_length=1,
            max_length=16,
            description="fractions of the steps during which self-attention is replaced; all values run as "
            "one batched pass and the candidate with the best S_CLIP is kept",
        ),
        CommaList,
    ] = (0.4, 0.5, 0.6, 0.7, 0.8)
    edit_word_weight: Annotated[
        float, Field(ge=0.0, le=10.0, description="cross-attention weight of the reweighted words")
    ] = 2.0
    blend_words: Annotated[
        tuple[str, ...] | None,
        CommaList,
        Field(
            description="words whose attention marks the region to edit; default: the content words that differ, "
            "or the phrase after a changed 'with'/'without'/'no'"
        ),
    ] = None
    reweight_words: Annotated[
        tuple[str, ...] | None,
        CommaList,
        Field(description="edit-prompt words to reweight; default: the words the edit prompt adds"),
    ] = None
    blend_threshold: Annotated[
        float | None,
        Field(
            gt=0.0,
            lt=1.0,
            description="LocalBlend threshold on the normalised attention maps; default: the model's "
            f"(its local_blend.json), P2P's {P2P_BLEND_THRESHOLD} for a model without one",
        ),
    ] = None
    blend_edit_maps: Annotated[
        BlendEditMaps,
        Field(
            description="the edit branch's maps LocalBlend reads: replaced (after Replace/Refine/Reweight, as "
            "the reference code and published PRISM) or own (its attention before prompt-to-prompt changes it)"
        ),
    ] = "replaced"
    seed: Annotated[
        int,
        Field(
            ge=0,
            le=2**31 - 1,
            description="seed of the noise a method draws; PRISM's inversion and editing are deterministic",
        ),
    ] = 0
    inversion: Annotated[
        InversionMode,
        Field(
            description="null_text: PRISM's optimised null-text inversion (slowest, the paper's); negative_prompt: "
            "the source prompt as the unconditional embedding, no optimisation (Miyake et al.); direct: the source "
            "branch kept on the inversion trajectory by stored per-step offsets, no optimisation (Ju et al.)"
        ),
    ] = "null_text"
    strength: Annotated[
        Fraction,
        Field(
            description="sdedit: how far into the noise schedule the input goes (seed 004: 0.85 with guidance 7.5 and "
            "75 steps; 0.55 with guidance 4 for milder edits); 0 returns the reconstruction"
        ),
    ] = 0.85
    classifier_weight: Annotated[
        float, Field(ge=0.0, le=1e4, description="guided: weight of the classifier's target loss")
    ] = 3.0
    l1_weight: Annotated[
        float, Field(ge=0.0, le=1e4, description="guided: weight of the L1 distance between decoded x0 and the input")
    ] = 10.0
    classifier_targets: Annotated[
        dict[str, Literal[0, 1]] | None,
        BeforeValidator(lambda v: parse_labels(v, "classifier_targets") if isinstance(v, str) else v),
        Field(
            description="guided: the findings the classifier should see removed (0) or present (1); default: the "
            "conditions the edit changes (findings input)"
        ),
    ] = None
    output: Annotated[
        OutputMode,
        Field(
            description="residual: the input plus the edit's effect (decoded edit - decoded reconstruction) "
            "where the edit changed the latent, so unedited pixels keep their values; decoded: the decoded "
            "edit, as in the paper"
        ),
    ] = "residual"
    outputs: Annotated[
        tuple[FileName, ...],
        Field(
            min_length=1,
            max_length=len(FILE_NAMES),
            description=f"the result files to write; {REPORT_FILE} always is, listed or not (it is the job's "
            "result), and the .dcm files only for a DICOM input",
        ),
        BeforeValidator(_named_files),
        AfterValidator(_with_report),
    ] = FILE_NAMES


class EditParams(EditOptions):
    """The client's options plus the settings PRISM fixes (DESIGN.md section 2)."""

    null_text: NullTextSettings = NullTextSettings()
    local_blend: Annotated[bool, Field(description="apply LocalBlend when blend words exist")] = True
    blend_start: Annotated[Fraction, Field(description="LocalBlend acts from this fraction of the steps on")] = 0.2
    s_clip_threshold: Annotated[float, Field(ge=-1.0, le=1.0, description="PRISM keeps edits at or above")] = 0.1

    def replace(self, **changes: Any) -> EditParams:
        """A validated copy with ``changes`` applied (``model_copy`` would skip validation)."""
        return EditParams.model_validate({**self.model_dump(), **changes})


class FinetuneConfig(BaseModel):
    """One fine-tuning run; every field is a ``prism finetune`` flag."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    steps: Annotated[int, Field(ge=1, description="optimiser steps")] = 1000
    batch_size: Annotated[int, Field(ge=1)] = 4
    gradient_accumulation: Annotated[int, Field(ge=1, description="micro-batches per optimiser step")] = 1
    learning_rate: Annotated[float, Field(gt=0)] = 1e-5
    lr_schedule: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    caption_dropout: Annotated[float, Field(ge=0, le=1, description="empty captions, for guidance")] = 0.1
    ema_decay: Annotated[float | None, Field(gt=0, lt=1, description="EMA of the UNet; None: off")] = None
    train_text_encoder: bool = False
    max_grad_norm: Annotated[float | None, Field(gt=0, description="clip the gradient norm; None: off")] = 1.0
    cache_latents: bool = Field(
        False, description="encode every image once (the VAE is frozen) instead of at every step"
    )
    checkpoint_every: Annotated[int, Field(ge=1)] = 500
    validate_every: Annotated[int, Field(ge=0, description="steps between validation edits; 0: never")] = 0
    seed: int = 0
