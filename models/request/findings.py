"""Findings as prompts: PRISM's caption template (paper, Appendix A, Code Listing 1). Torch-free.

One implementation for the service's ``findings``/``edit`` input, ``prism edit``, fine-tuning
captions and the phantoms. The template: the 14 CheXpert conditions in their order, a condition
included when its label is exactly 1 (not 0, -1 "uncertain" or blank), joined by ", " after
"Chest X-ray showing "; "Normal chest X-ray with no significant findings" when none is.

"No Finding" is one of the listing's conditions and is treated like the others, as the listing
does: a row with "No Finding" = 1 is captioned "Chest X-ray showing No Finding" (and, beside other
findings, "Chest X-ray showing No Finding, Cardiomegaly"). The "Normal chest X-ray ..." caption is
for rows where no condition is 1. Following the listing keeps captions identical to those the
published model was fine-tuned on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Literal, get_args

from models.request.errors import InvalidInput, NothingToEdit

Condition = Literal[
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
]
CONDITIONS: tuple[str, ...] = get_args(Condition)
LABELS = (1, 0, -1)
"""CheXpert's values: present, absent, uncertain; a blank (None) is "not mentioned"."""
Labels = dict[str, int | None]

NORMAL = "Normal chest X-ray with no significant findings"
SHOWING = "Chest X-ray showing "
_CANONICAL = {c.lower(): c for c in CONDITIONS}


def caption(labels: Mapping[str, float | int | None]) -> str:
    """The template's caption of one row of labels (missing conditions count as blank)."""
    present = [c for c in CONDITIONS if labels.get(c) == 1]
    return SHOWING + ", ".join(present) if present else NORMAL


def _label(value: object, field: str, condition: str) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidInput(field, f"{condition!r}: {value!r} is not a label (1, 0, -1 or blank)") from None
    if number not in LABELS:
        raise InvalidInput(field, f"{condition!r}: {value!r} is not a label (1, 0, -1 or blank)")
    return int(number)


def normalize_labels(labels: Mapping[str, object], field: str) -> Labels:
    """Canonical condition names (matched case-insensitively) and integer labels, or InvalidInput."""
    out: Labels = {}
    for name, value in labels.items():
        condition = _CANONICAL.get(str(name).strip().lower())
        if condition is None:
            raise InvalidInput(field, f"{name!r} is not one of the 14 CheXpert conditions")
        out[condition] = _label(value, field, condition)
    return out


def parse_labels(text: str | Mapping[str, object], field: str) -> Labels:
    """Labels from a JSON object or ``Label=value`` pairs separated by ``;`` or ``,``."""
    if isinstance(text, Mapping):
        return normalize_labels(text, field)
    text = text.strip()
    if text.startswith("{"):
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError):  # a syntax error, an integer over 4300 digits, nesting too deep
            raise InvalidInput(field, "is not a valid JSON object") from None
        if not isinstance(raw, dict):
            raise InvalidInput(field, "must be a JSON object of condition: label")
        return normalize_labels(raw, field)
    pairs = {}
    for part in text.replace(";", ",").split(","):
        if part.strip():
            name, sep, value = part.partition("=")
            if not sep:
                raise InvalidInput(field, f"{part.strip()!r} is not 'Condition=label'")
            pairs[name] = value.strip()
    return normalize_labels(pairs, field)


def findings_prompts(
    findings: Mapping[str, int | None], edit: Mapping[str, int | None]
) -> tuple[str, str, tuple[str, ...]]:
    """The original and edit prompts of a findings row and an edit of it, and the conditions whose
    presence the edit changes (the words LocalBlend should follow)."""
    before = dict(findings)
    after = before | dict(edit)
    changed = tuple(c for c in CONDITIONS if (before.get(c) == 1) != (after.get(c) == 1))
    if not changed:
        raise NothingToEdit("edit", "changes no condition's presence, so the caption would not change")
    return caption(before), caption(after), changed
