"""What the engine reports about one counterfactual: one typed declaration, torch-free.

``result.json``, the job status's ``result`` and the OpenAPI schema are all this model, so a new
field is one edit here.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from models.request.params import DICOM_FILES, FILE_NAMES, EditParams, InversionMode, Method


class Record(BaseModel):
    """Base of the report's parts: immutable, and no unknown fields when read back."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class EditScores(Record):
    """CLIP similarities of one candidate (LANCE's set); S_CLIP is the directional one."""

    s_clip: Annotated[
        float, Field(description="cos(E_I(edit) - E_I(reference), E_T(edit prompt) - E_T(original prompt))")
    ]
    image_similarity: Annotated[float, Field(description="cos(E_I(edit), E_I(reference))")]
    text_image_before: Annotated[float, Field(description="cos(E_I(reference), E_T(original prompt))")]
    text_image_after: Annotated[float, Field(description="cos(E_I(edit), E_T(edit prompt))")]
    edit_text_image_before: Annotated[float, Field(description="cos(E_I(reference), E_T(edit prompt))")]


class CandidateScores(EditScores):
    """One candidate and its scores (PRISM's: one per self_replace value)."""

    self_replace_steps: Annotated[float | None, Field(description="prism's sweep value; null for other methods")]


class Geometry(Record):
    """How the input was mapped to the model's square: padded (never cropped), then resized."""

    height: int
    width: int
    side: Annotated[int, Field(description="side of the padded square, in input pixels")]
    top: int
    left: int
    model_size: int
    method: str = "pad-to-square (black), resize (bicubic, antialiased)"


class ModelInfo(Record):
    identity: Annotated[str, Field(description="fingerprint of every weight and config file")]
    resolution: int
    device: str
    dtype: str
    compile: Annotated[str, Field(description="how the inversion loops' UNet ran: off (eager), compile, cudagraph")] = (
        "off"
    )


class InversionInfo(Record):
    mode: InversionMode
    key: Annotated[str, Field(description="content hash of everything the inversion depends on")]
    cached: Annotated[bool, Field(description="the inversion came from the cache")]
    final_losses: Annotated[list[float], Field(description="null-text losses of the last three steps (null_text)")]


class DifferenceInfo(Record):
    definition: str = "counterfactual - input, intensities in [0, 1]"
    min: float
    max: float


InputFormat = Literal["image", "dicom"]


class StoredInstance(Record):
    file: Annotated[str, Field(description="the output stored, e.g. counterfactual.dcm")]
    sop_instance_uid: str
    status: Annotated[str, Field(description="stored, or the peer's C-STORE status (0x0000: success)")]
    retrieve_url: Annotated[str | None, Field(description="where the PACS serves it (STOW-RS's answer)")] = None


class StoredCopy(Record):
    """Where a job's DICOM outputs were stored (the request's ``store_to``): set by the worker."""

    endpoint: Annotated[str, Field(description="the PACS endpoint's name")]
    protocol: Literal["STOW-RS", "C-STORE"]
    instances: list[StoredInstance]


class EditReport(Record):
    """Scores, choices and provenance of one counterfactual."""

    method: Method = "prism"
    s_clip: Annotated[float, Field(description="CLIP directional score of the chosen candidate, in [-1, 1]")]
    passed: Annotated[bool, Field(description="s_clip >= s_clip_threshold (PRISM keeps edits with S_CLIP >= 0.1)")]
    s_clip_threshold: float
    similarities: EditScores
    score_reference: Annotated[str, Field(description="which image the scores compare against")]
    chosen_self_replace: float | None
    candidates: list[CandidateScores]
    timings: Annotated[dict[str, float], Field(description="seconds per phase (in a pack, the phases this job shared)")]
    pack_size: Annotated[
        int, Field(description="counterfactuals made in one pack with this one (a packing worker's), itself included")
    ] = 1
    parameters: EditParams
    model: ModelInfo
    geometry: Geometry
    bit_depth: Annotated[int, Field(description="bit depth of the PNG outputs: 8, or 16 for deeper inputs")]
    input_format: Annotated[InputFormat, Field(description="dicom inputs get DICOM outputs too")] = "image"
    input_colour: Annotated[
        str | None,
        Field(
            description="how a grey input was stored in colour (e.g. RGB, P, YBR_FULL_422) and so read as grey; "
            "null for a greyscale file"
        ),
    ] = None
    original_prompt: Annotated[str, Field(description="the prompt that describes the input")]
    edit_prompt: Annotated[str, Field(description="the prompt the counterfactual was edited towards")]
    inversion: Annotated[InversionInfo | None, Field(description="prism's inversion; null for other methods")]
    anatomy_mask: Annotated[bool, Field(description="guided: an anatomy mask was kept (no blending without one)")] = (
        False
    )
    blend_threshold: Annotated[
        float | None,
        Field(
            description="prism: where LocalBlend cut the mask, the request's blend_threshold or else the model's "
            "for the blend words; null when nothing was blended"
        ),
    ] = None
    edited_fraction: Annotated[float, Field(description="fraction of the image where the edit changed the latent")]
    difference: DifferenceInfo
    difference_png_scale: Annotated[float, Field(description="|difference| drawn at full colour in difference.png")]
    stored: Annotated[
        StoredCopy | None, Field(description="the PACS copy of the DICOM outputs (store_to); null without one")
    ] = None

    @property
    def file_names(self) -> tuple[str, ...]:
        """The names of the files this counterfactual has, in :data:`FILE_NAMES` order: those its
        request chose (``parameters.outputs``, result.json among them), the DICOM ones for a DICOM
        input only. The engine writes exactly these; the API links and serves exactly these."""
        dicom = self.input_format == "dicom"
        return tuple(n for n in FILE_NAMES if n in self.parameters.outputs and (dicom or n not in DICOM_FILES))
