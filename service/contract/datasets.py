"""The layout of a counterfactual dataset, one for ``GET /batches/{id}/dataset.zip`` and for the
folder ``prism batch`` writes: result files in one folder per kind, named after the input's path
(its folders kept, its image extension replaced: :func:`models.request.manifest.output_stem`, the
manifest's own name rule), and ``manifest.csv`` with one line per manifest row.

    counterfactuals/<path>.png   counterfactuals/<path>.dcm  (DICOM inputs: a Secondary Capture)
    differences/<path>.png       differences/<path>.npy       differences/<path>.dcm
    results/<path>.json          manifest.csv
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping

from pydantic import BaseModel, ValidationError

from models.request.manifest import output_stem

MANIFEST = "manifest.csv"
LAYOUT = {
    "counterfactual.png": "counterfactuals/{stem}.png",
    "counterfactual.dcm": "counterfactuals/{stem}.dcm",
    "difference.png": "differences/{stem}.png",
    "difference.npy": "differences/{stem}.npy",
    "difference.dcm": "differences/{stem}.dcm",
    "report.dcm": "reports/{stem}.dcm",
    "result.json": "results/{stem}.json",
}
"""Which of a job's files a dataset holds, and where; the reconstruction (a check of the
inversion) stays with the job."""


def dataset_names(path: str, file_names: Iterable[str]) -> dict[str, str]:
    """A job's file name -> its name in the dataset, for the files a dataset holds; raises
    :class:`~models.request.manifest.InvalidPath` for a path outside the name rule."""
    stem = output_stem(path)
    return {name: LAYOUT[name].format(stem=stem) for name in file_names if name in LAYOUT}


def counterfactual_name(names: Mapping[str, str]) -> str:
    """``manifest.csv``'s ``counterfactual`` column, from :func:`dataset_names`: the row's
    counterfactual in the dataset, the PNG or else the DICOM; empty when its ``outputs`` had neither."""
    return names.get("counterfactual.png") or names.get("counterfactual.dcm", "")


class ManifestLine(BaseModel):
    """One row of ``manifest.csv``: a manifest row and how it ended."""

    line: int
    path: str
    status: str
    reason: str = ""
    error_code: str = ""
    original_prompt: str = ""
    edit_prompt: str = ""
    s_clip: float | None = None
    passed: bool | None = None
    chosen_self_replace: float | None = None
    counterfactual: str = ""
    job_id: str = ""


COLUMNS = tuple(ManifestLine.model_fields)


def manifest_csv(lines: Iterable[ManifestLine]) -> bytes:
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, COLUMNS, lineterminator="\n")
    writer.writeheader()
    for line in lines:
        writer.writerow({k: "" if v is None else v for k, v in line.model_dump().items()})
    return buffer.getvalue().encode()


class NotADatasetManifest(ValueError):
    """A ``manifest.csv`` this layout did not write (edited by hand, or another file)."""


def read_manifest_csv(data: bytes) -> list[ManifestLine]:
    """The lines of a ``manifest.csv`` that :func:`manifest_csv` wrote; raises :class:`NotADatasetManifest`."""
    try:
        rows = csv.DictReader(io.StringIO(data.decode(), newline=""))
    except UnicodeDecodeError:
        raise NotADatasetManifest("it is not UTF-8 text") from None
    try:
        return [ManifestLine.model_validate({k: v for k, v in row.items() if k in COLUMNS and v}) for row in rows]
    except csv.Error as exc:
        raise NotADatasetManifest(f"line {rows.line_num}: {exc}") from None
    except ValidationError as exc:
        error = exc.errors()[0]
        raise NotADatasetManifest(f"line {rows.line_num}: {error['loc'][0]}: {error['msg']}") from None
