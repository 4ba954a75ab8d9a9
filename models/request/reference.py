"""A radiograph named by reference, as a viewer or a PACS names it: DICOM UIDs. Torch-free.

Where the study lives (a PACS endpoint) is the service's business; this is only what the client says.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field

UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"
Uid = Annotated[str, Field(pattern=UID_PATTERN, max_length=64)]
"""A DICOM UID: digits and dots, at most 64 characters (PS3.5 9.1)."""
REFERENCE_FIELDS = ("study_uid", "series_uid", "sop_uid")
"""The fields (and manifest columns) of a reference, widest first: a study, a series in it, an instance."""


def is_uid(value: str) -> bool:
    return len(value) <= 64 and re.fullmatch(UID_PATTERN, value) is not None


def reference_path(uids: tuple[str, ...]) -> str:
    """A referenced image's name in a batch and its dataset: its UIDs as folders, ``study/series/sop``."""
    return "/".join(uids)
