"""Captions for phantoms: PRISM's template (paper, Code Listing 1) and the variants people type.

The explicit form names every finding with "with" or "without" in a fixed order, so toggling
one finding changes exactly one word: the benchmark's prompt pairs use it (prompt-to-prompt
Replace), while training sees all forms.
"""

from __future__ import annotations

import numpy as np

from models.request.findings import caption
from phantoms.render import FINDINGS, Findings

NAMES = {"cardiomegaly": "Cardiomegaly", "pleural_effusion": "Pleural Effusion", "support_devices": "Support Devices"}


def labels(findings: Findings) -> dict[str, int]:
    """The phantom's findings as CheXpert labels (1 present, 0 absent)."""
    return {NAMES[n]: int(getattr(findings, n)) for n in FINDINGS}


def prism_caption(findings: Findings) -> str:
    """Exactly the PRISM template (the same implementation as the service's findings input)."""
    return caption(labels(findings))


def explicit_caption(findings: Findings) -> str:
    """'chest x-ray of a patient with cardiomegaly, without pleural effusion, with support devices'."""
    parts = [f"{'with' if getattr(findings, n) else 'without'} {NAMES[n].lower()}" for n in FINDINGS]
    return "chest x-ray of a patient " + ", ".join(parts)


def typed_caption(findings: Findings, rng: np.random.Generator) -> str:
    """A looser variant: other openings, 'and', lower case, abbreviations."""
    present = [NAMES[n].lower() for n in FINDINGS if getattr(findings, n)]
    opening = rng.choice(
        ["chest x-ray showing", "cxr showing", "chest radiograph with", "chest x-ray of a patient with"]
    )
    if not present:
        return str(rng.choice(["normal chest x-ray", "chest x-ray with no findings", "normal chest radiograph"]))
    if len(present) > 1 and rng.random() < 0.5:
        body = ", ".join(present[:-1]) + " and " + present[-1]
    else:
        body = ", ".join(present)
    return f"{opening} {body}"


def training_caption(findings: Findings, rng: np.random.Generator) -> str:
    """Half explicit, a quarter PRISM template, a quarter typed variants."""
    u = rng.random()
    if u < 0.5:
        return explicit_caption(findings)
    if u < 0.75:
        return prism_caption(findings)
    return typed_caption(findings, rng)
