"""A batch's manifest: one CSV row per image, in the table format ``prism finetune`` reads. Torch-free.

Columns are matched regardless of case and surrounding spaces, and the file may start with a
byte-order mark (a spreadsheet's "CSV UTF-8"):

* ``Path``: the image, a file name inside the batch (required);
* findings: any of the 14 CheXpert condition columns (1, 0, -1 or blank; a missing column is
  blank), with the batch's ``edit`` labels, or a row's own ``edit`` cell, saying what to change; or
* prompts: ``original_prompt`` (``caption``, as ``prism finetune`` calls it) and ``edit_prompt``,
  a row's empty cell taking the batch's value.

Every row is resolved here as a single submission is (:func:`~models.request.resolve.resolve`),
so a manifest is refused as a whole, every bad cell listed by line and column, before any of it
runs. A findings row the edit does not change (no devices to remove) is skipped with its reason.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from models.request.errors import InvalidInput, NothingToEdit
from models.request.findings import CONDITIONS, normalize_labels, parse_labels
from models.request.resolve import EditRequest, ResolvedEdit, resolve

PATH = "Path"
EDIT = "edit"
ORIGINAL = "original_prompt"
EDIT_PROMPT = "edit_prompt"
CAPTION = "caption"
"""``prism finetune``'s name for what the image shows: read as ``original_prompt``."""
HEADER_LINE = 1


class RowError(BaseModel):
    """One bad cell: its line in the file (the header is line 1) and its column."""

    model_config = ConfigDict(frozen=True)

    line: int
    column: str
    message: str


class ManifestInvalid(ValueError):
    """The manifest cannot be read at all (no ``Path`` column, not UTF-8, no rows)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.error = RowError(line=HEADER_LINE, column="", message=message)


class PlannedItem(BaseModel):
    """A row as it will run: its request and the edit it resolved to, or why it is skipped."""

    model_config = ConfigDict(frozen=True)

    line: int
    path: str
    request: EditRequest
    edit: ResolvedEdit | None = None
    skipped: str | None = None


class Manifest(BaseModel):
    items: list[PlannedItem]
    errors: list[RowError]


def find_file(root: Path, written: str) -> Path | None:
    """``written`` under ``root``, else its shorter tails: CheXpert's ``Path`` starts with the
    dataset's own folder (``CheXpert-v1.0/train/patient…/study1/view1_frontal.jpg``), which
    ``root`` may already be."""
    parts = Path(written).parts
    for start in range(len(parts)):
        candidate = root.joinpath(*parts[start:])
        if candidate.is_file():
            return candidate
    return None


def _columns(header: list[str]) -> dict[str, str]:
    """Each known column's canonical name -> the file's own spelling."""
    known = {name.lower(): name for name in (PATH, EDIT, ORIGINAL, EDIT_PROMPT, CAPTION, *CONDITIONS)}
    return {known[h.strip().lower()]: h for h in header if h and h.strip().lower() in known}


def read_rows(data: bytes) -> tuple[dict[str, str], list[tuple[int, dict[str, str]]]]:
    """The known columns (canonical name -> the file's spelling) and the non-blank rows with their
    line numbers; raises :class:`ManifestInvalid` when the file as a whole is unusable."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ManifestInvalid("the manifest is not UTF-8 text") from None
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = _columns(reader.fieldnames or [])
        rows = [(reader.line_num, row) for row in reader if any((v or "").strip() for v in row.values())]
    except csv.Error as exc:
        raise ManifestInvalid(f"the manifest is not a readable CSV ({exc})") from None
    if PATH not in columns:
        raise ManifestInvalid("the manifest needs a 'Path' column naming each image")
    if not rows:
        raise ManifestInvalid("the manifest has no rows")
    conditions = [c for c in CONDITIONS if c in columns]
    prompts = [c for c in (ORIGINAL, CAPTION, EDIT_PROMPT) if c in columns]
    if conditions and prompts:
        raise ManifestInvalid(f"give condition columns or prompt columns, not both ({conditions[0]!r}, {prompts[0]!r})")
    if ORIGINAL in columns and CAPTION in columns:
        raise ManifestInvalid("give 'original_prompt' or 'caption', not both")
    return columns, rows


def _cell(row: dict[str, Any], columns: dict[str, str], name: str) -> str:
    return (row.get(columns[name]) or "").strip() if name in columns else ""


def _row_fields(row: dict[str, Any], columns: dict[str, str], line: int, errors: list[RowError]) -> dict[str, Any]:
    """The row's own request fields (condition labels, ``edit``, prompts), each bad cell an error."""
    fields: dict[str, Any] = {}
    findings: dict[str, int | None] = {}
    for condition in CONDITIONS:
        if condition in columns:
            try:
                findings |= normalize_labels({condition: row.get(columns[condition])}, "findings")
            except InvalidInput as exc:
                errors.append(RowError(line=line, column=columns[condition], message=exc.message))
    if any(c in columns for c in CONDITIONS):
        fields["findings"] = findings
    if edit := _cell(row, columns, EDIT):
        try:
            fields["edit"] = parse_labels(edit, "edit")
        except InvalidInput as exc:
            errors.append(RowError(line=line, column=columns[EDIT], message=exc.message))
    if original := _cell(row, columns, ORIGINAL) or _cell(row, columns, CAPTION):
        fields["original_prompt"] = original
    if edit_prompt := _cell(row, columns, EDIT_PROMPT):
        fields["edit_prompt"] = edit_prompt
    return fields


def _column(field: str, columns: dict[str, str]) -> str:
    """Where a request field came from: its manifest column if the file has one, else the form field."""
    if field == ORIGINAL and CAPTION in columns:
        return columns[CAPTION]
    return columns.get(field, field)


def read_manifest(data: bytes, base: EditRequest, tokenizer=None, with_mask: bool = False) -> Manifest:
    """Every row of the CSV ``data`` resolved over the batch's ``base`` request (its options, its
    ``edit`` labels or prompts), or the errors that stop the batch; raises :class:`ManifestInvalid`
    when the file as a whole is unusable."""
    columns, rows = read_rows(data)
    base_fields = base.model_dump(exclude_none=True)
    items: list[PlannedItem] = []
    errors: list[RowError] = []
    first_line: dict[str, int] = {}
    for line, row in rows:
        path = _cell(row, columns, PATH).replace("\\", "/")
        if not path:
            errors.append(RowError(line=line, column=columns[PATH], message="the image's path is empty"))
            continue
        if path in first_line:
            message = f"{path!r} is also on line {first_line[path]}: one row per image"
            errors.append(RowError(line=line, column=columns[PATH], message=message))
            continue
        first_line[path] = line
        before = len(errors)
        fields = _row_fields(row, columns, line, errors)
        if len(errors) > before:
            continue
        try:
            request = EditRequest.model_validate({**base_fields, **fields})
            edit = resolve(request, tokenizer, with_mask)
            items.append(PlannedItem(line=line, path=path, request=request, edit=edit))
        except NothingToEdit as exc:
            items.append(PlannedItem(line=line, path=path, request=request, skipped=f"the edit {exc.message}"))
        except InvalidInput as exc:
            errors.append(RowError(line=line, column=_column(exc.field, columns), message=exc.message))
        except ValidationError as exc:
            for e in exc.errors():
                field = str(e["loc"][0]) if e["loc"] else ""
                message = e["msg"].removeprefix("Value error, ")
                errors.append(RowError(line=line, column=_column(field, columns), message=message))
    return Manifest(items=items, errors=errors)
