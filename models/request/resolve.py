"""A request resolved once, at the door: prompts or CheXpert findings in, the two prompts and the
engine's :class:`~models.request.params.EditParams` out, every check that needs no model run.

The API resolves a submission before it is enqueued and the job carries the result; the worker runs
what was resolved and a status poll shows its prompts, so nothing downstream resolves again (a
changed findings table cannot make a job's shown prompts differ from those it ran). ``prism edit``
and ``prism finetune`` resolve the same way. Torch-free.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from models.request.errors import InvalidInput
from models.request.findings import Condition, findings_prompts, parse_labels
from models.request.params import EditOptions, EditParams
from models.request.tokenizer import clip_tokenizer
from models.request.validation import validate_request

PROMPT_MAX_CHARS = 1000


def _labels(field: str):
    return BeforeValidator(lambda value: None if value in (None, "") else parse_labels(value, field))


LabelRow = dict[Condition, Literal[1, 0, -1] | None]


class EditRequest(EditOptions):
    """What a client asks for: what the image shows and what the counterfactual should show, as
    prompts or as CheXpert findings, and the edit options."""

    original_prompt: Annotated[
        str | None,
        Field(
            max_length=PROMPT_MAX_CHARS,
            description="what the image shows (or give findings and edit)",
            examples=["chest x-ray of a patient with support devices"],
        ),
    ] = None
    edit_prompt: Annotated[
        str | None,
        Field(
            max_length=PROMPT_MAX_CHARS,
            description="what the counterfactual should show",
            examples=["chest x-ray of a patient without support devices"],
        ),
    ] = None
    findings: Annotated[
        LabelRow | None,
        _labels("findings"),
        Field(description="instead of prompts: the image's CheXpert labels (1, 0, -1 or blank per condition)"),
    ] = None
    edit: Annotated[
        LabelRow | None,
        _labels("edit"),
        Field(description="with findings: the labels to change, e.g. {'Support Devices': 0}"),
    ] = None


class ResolvedEdit(BaseModel):
    """The edit the engine runs: both prompts and every parameter, defaults filled in."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    original_prompt: str
    edit_prompt: str
    params: EditParams = EditParams()


def resolve(request: EditRequest, tokenizer=None, with_mask: bool = False) -> ResolvedEdit:
    """Findings become prompts by PRISM's caption template; LocalBlend follows, and the guided
    method's classifier targets, the conditions the edit changes, unless given. The prompts and word
    lists are checked against the CLIP ``tokenizer`` (the shipped one by default), and an anatomy
    mask (``with_mask``) against the method, the only one that reads it. Raises
    :class:`~models.request.errors.InvalidInput` naming the field."""
    edit = _prompts(request)
    if with_mask and edit.params.method != "guided":
        message = f"an anatomy mask is used by method=guided only, not by method={edit.params.method}"
        raise InvalidInput("mask", message)
    if edit.params.method == "guided" and not edit.params.classifier_targets:
        message = "the guided method needs the findings to remove (0) or add (1), or findings and edit"
        raise InvalidInput("classifier_targets", message)
    validate_request(tokenizer or clip_tokenizer(), edit.original_prompt, edit.edit_prompt, edit.params)
    return edit


def _prompts(request: EditRequest) -> ResolvedEdit:
    params = EditParams(**request.model_dump(include=set(EditOptions.model_fields)))
    if request.findings is None and request.edit is None:
        return ResolvedEdit(
            original_prompt=request.original_prompt or "", edit_prompt=request.edit_prompt or "", params=params
        )
    if request.original_prompt or request.edit_prompt:
        raise InvalidInput("findings", "give findings and edit, or original_prompt and edit_prompt, not both")
    if request.findings is None or request.edit is None:
        raise InvalidInput("findings" if request.findings is None else "edit", "findings and edit go together")
    original, edited, changed = findings_prompts(request.findings, request.edit)
    after = {**request.findings, **request.edit}
    defaults = {
        "blend_words": changed if params.blend_words is None else params.blend_words,
        "classifier_targets": params.classifier_targets or {c: int(after.get(c) == 1) for c in changed},
    }
    return ResolvedEdit(original_prompt=original, edit_prompt=edited, params=params.replace(**defaults))
