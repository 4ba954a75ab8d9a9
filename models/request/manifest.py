"""A batch's manifest: one CSV row per image, in the table format ``prism finetune`` reads. Torch-free.

It reads what spreadsheets write: a comma, semicolon or tab delimiter (found from the header, the
one line that must name ``Path``), a byte-order mark (Excel's "CSV UTF-8"), CRLF or CR line ends,
quoted cells (with delimiters or line breaks inside), blank rows, and rows with fewer cells than the
header (blank) or more (if those are empty). Anything else is refused by line and column. Columns
are matched regardless of case and surrounding spaces:

* ``Path``: the image, a file name inside the batch (required);
* findings: any of the 14 CheXpert condition columns (1, 0, -1 or blank; a missing column is
  blank), with the batch's ``edit`` labels, or a row's own ``edit`` cell, saying what to change; or
* prompts: ``original_prompt`` (``caption``, as ``prism finetune`` calls it) and ``edit_prompt``,
  a row's empty cell taking the batch's value.

Every row is resolved here as a single submission is (:func:`~models.request.resolve.resolve`),
so a manifest is refused as a whole, every bad cell listed by line and column, before any of it
runs. A findings row the edit does not change (no devices to remove) is skipped with its reason.

Names follow one rule (:func:`clean_path`), the same for a ``Path`` cell, a ZIP entry and the
outputs named after them (:func:`output_stem`), so no name can lead outside its folder and no two
rows write the same outputs.
"""

from __future__ import annotations

import csv
import io
import unicodedata
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from models.request.errors import InvalidInput, NothingToEdit
from models.request.findings import CONDITIONS, normalize_labels, parse_labels
from models.request.params import FILE_NAMES
from models.request.reference import REFERENCE_FIELDS, is_uid, reference_path
from models.request.resolve import EditRequest, ResolvedEdit, resolve

PATH = "Path"
STUDY = REFERENCE_FIELDS[0]
EDIT = "edit"
ORIGINAL = "original_prompt"
EDIT_PROMPT = "edit_prompt"
CAPTION = "caption"
"""``prism finetune``'s name for what the image shows: read as ``original_prompt``."""
DELIMITERS = (",", ";", "\t")
"""The comma; the semicolon of spreadsheets in locales whose decimal mark is a comma; the tab of
"tab-delimited text". Of those that give the header a ``Path`` column, the one that splits it
into the most columns is used (the first of them on a tie)."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
"""The extensions an output name drops (any case). Other dots stay: a PACS export names files by
UID (``1.2.826.….11``, ``….12``), whose last part is no extension."""
OUTPUT_SUFFIXES = tuple(sorted({PurePosixPath(name).suffix for name in FILE_NAMES}))
"""What an output name adds to its stem (``.png``, ``.dcm``, ``.npy``, ``.json``)."""
MAX_NAME_BYTES = 250
"""A part of a path, in UTF-8: file systems hold 255 bytes, less the longest suffix an output adds."""


class RowError(BaseModel):
    """One bad cell: its line in the file (the header is line 1) and its column."""

    model_config = ConfigDict(frozen=True)

    line: int
    column: str
    message: str


class ManifestInvalid(ValueError):
    """The manifest cannot be read at all (no ``Path`` column, not UTF-8, no rows); the message
    names the line where it can."""


class PlannedItem(BaseModel):
    """A row as it will run: its request and the edit it resolved to, or why it is skipped."""

    model_config = ConfigDict(frozen=True)

    line: int
    path: str
    request: EditRequest
    edit: ResolvedEdit | None = None
    skipped: str | None = None
    reference: dict[str, str] | None = None
    """A row by reference: its ``study_uid`` (``series_uid``, ``sop_uid``) for the batch's ``source``."""


class Manifest(BaseModel):
    items: list[PlannedItem]
    errors: list[RowError]
    by_reference: bool = False
    """Its rows name studies (``study_uid``), not files (``Path``)."""


@dataclass(frozen=True)
class Table:
    """A manifest read as a table: each known column's canonical name -> the file's spelling, the
    non-blank rows (their first line, the header's spelling -> cell) and the rows refused whole."""

    columns: dict[str, str]
    rows: list[tuple[int, dict[str, str]]]
    errors: list[RowError]


class InvalidPath(ValueError):
    """A name that is empty or could lead outside its folder; the message says why."""


def clean_path(written: str) -> str:
    """The one form of a manifest ``Path``, a ZIP entry's name and the outputs named after them:
    Unicode NFC (macOS archivers write decomposed names), ``/`` between parts (Windows tools write
    ``\\``), no empty or ``.`` parts. Raises :class:`InvalidPath` for a name that is empty,
    absolute (``/x``, ``C:x``), climbs (``..``), holds a control character, or has a part that
    no file system holds."""
    text = unicodedata.normalize("NFC", written).replace("\\", "/")
    if any(unicodedata.category(char) in ("Cc", "Cs") for char in text):
        raise InvalidPath("holds a control character")
    if text.startswith("/"):
        raise InvalidPath("is absolute (starts with '/')")
    if text[1:2] == ":":
        raise InvalidPath("starts with a drive letter")
    parts = [part for part in text.split("/") if part not in ("", ".")]
    if not parts:
        raise InvalidPath("is empty")
    for part in parts:
        if part == "..":
            raise InvalidPath("climbs out of its folder ('..')")
        if not part.strip(". "):
            raise InvalidPath("has a part made only of dots and spaces")
        if len(part.encode()) > MAX_NAME_BYTES:
            raise InvalidPath(f"has a part longer than {MAX_NAME_BYTES} bytes")
    return "/".join(parts)


def output_stem(path: str) -> str:
    """The name a row's outputs take: its clean path without an image extension (:data:`IMAGE_SUFFIXES`)."""
    clean = clean_path(path)
    head, _, last = clean.rpartition("/")
    base, dot, suffix = last.rpartition(".")
    if base and f"{dot}{suffix}".lower() in IMAGE_SUFFIXES:
        last = base
    return f"{head}/{last}" if head else last


def _clashes(paths: list[tuple[int, str]], column: str) -> list[RowError]:
    """Rows whose outputs would land on another row's: the same stem (``a.png`` and ``a.dcm``,
    or names that differ in case only, one file on macOS and Windows), or a stem whose folder is
    another row's output (``a.png`` and ``a.png/b.png``)."""
    errors: list[RowError] = []
    outputs: dict[str, tuple[int, str]] = {}
    for line, path in paths:
        key = output_stem(path).casefold()
        if (other := outputs.setdefault(key, (line, path)))[0] != line:
            message = f"{path!r} would write the same outputs as line {other[0]} ({other[1]!r}): rename one"
            errors.append(RowError(line=line, column=column, message=message))
    files = {stem + suffix: first for stem, first in outputs.items() for suffix in OUTPUT_SUFFIXES}
    for key, (line, path) in outputs.items():
        if folder := next((str(f) for f in PurePosixPath(key).parents if str(f) in files), None):
            message = (
                f"{path!r} would put outputs in a folder {folder!r}, a file of line {files[folder][0]}: rename one"
            )
            errors.append(RowError(line=line, column=column, message=message))
    return errors


def find_file(root: Path, written: str) -> Path | None:
    """``written`` under ``root``, else its shorter tails: CheXpert's ``Path`` starts with the
    dataset's own folder (``CheXpert-v1.0/train/patient…/study1/view1_frontal.jpg``), which
    ``root`` may already be. Each is tried composed and decomposed: a folder copied from macOS
    keeps decomposed names, and a batch's paths are composed (:func:`clean_path`)."""
    parts = Path(written).parts
    for start in range(len(parts)):
        tail = Path(*parts[start:])
        for form in dict.fromkeys((tail, Path(unicodedata.normalize("NFD", str(tail))))):
            if (candidate := root / form).is_file():
                return candidate
    return None


def _columns(header: list[str], line: int) -> dict[str, str]:
    """Each known column's canonical name -> the file's own spelling; a known column twice is refused."""
    known = {
        name.lower(): name for name in (PATH, *REFERENCE_FIELDS, EDIT, ORIGINAL, EDIT_PROMPT, CAPTION, *CONDITIONS)
    }
    columns: dict[str, str] = {}
    for spelling in header:
        if (name := known.get(spelling.strip().lower())) is not None:
            if name in columns:
                raise ManifestInvalid(f"line {line}: the column {name!r} appears twice")
            columns[name] = spelling
    return columns


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ManifestInvalid(f"line {line}: the manifest is not UTF-8 text (save it as 'CSV UTF-8')") from None


def _records(text: str, delimiter: str):
    """(first line, cells) of each record, blank ones included; csv.Error names its line."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    line = 1
    try:
        for cells in reader:
            yield line, cells
            line = reader.line_num + 1
    except csv.Error as exc:
        raise ManifestInvalid(f"line {line}: not a readable CSV row ({exc})") from None


def _header(text: str, delimiter: str) -> tuple[int, list[str]] | None:
    """The first non-blank record read with ``delimiter``, if it names a ``Path`` or a ``study_uid`` column."""
    names = (PATH.lower(), STUDY)
    try:
        for line, cells in _records(text, delimiter):
            if any(cell.strip() for cell in cells):
                return (line, cells) if any(cell.strip().lower() in names for cell in cells) else None
    except ManifestInvalid:
        return None
    return None


def read_rows(data: bytes) -> Table:
    """The manifest as a table (see the module docstring for what it reads); raises
    :class:`ManifestInvalid` when the file as a whole is unusable."""
    text = _decode(data)
    found = {d: header for d in DELIMITERS if (header := _header(text, d)) is not None}
    if not found:
        raise ManifestInvalid(
            "the manifest needs a 'Path' column naming each image in the ZIP, or a 'study_uid' column naming "
            "each study in the PACS (its header has neither, read with a comma, a semicolon or a tab between columns)"
        )
    delimiter = max(found, key=lambda d: len(found[d][1]))
    header_line, header = found[delimiter]
    columns = _columns(header, header_line)
    rows: list[tuple[int, dict[str, str]]] = []
    errors: list[RowError] = []
    for line, cells in _records(text, delimiter):
        if line <= header_line or not any(cell.strip() for cell in cells):
            continue
        if extra := next((n for n, cell in enumerate(cells[len(header) :], len(header) + 1) if cell.strip()), None):
            message = f"a value beyond the header's {len(header)} columns (a delimiter inside an unquoted cell?)"
            errors.append(RowError(line=line, column=f"column {extra}", message=message))
            continue
        rows.append((line, dict(zip_longest(header, cells[: len(header)], fillvalue=""))))
    if not rows and not errors:
        raise ManifestInvalid("the manifest has no rows")
    conditions = [c for c in CONDITIONS if c in columns]
    prompts = [c for c in (ORIGINAL, CAPTION, EDIT_PROMPT) if c in columns]
    if conditions and prompts:
        message = f"give condition columns or prompt columns, not both ({conditions[0]!r}, {prompts[0]!r})"
        raise ManifestInvalid(f"line {header_line}: {message}")
    if PATH in columns and STUDY in columns:
        raise ManifestInvalid(f"line {header_line}: give 'Path' (images in the ZIP) or 'study_uid' (studies), not both")
    if ORIGINAL in columns and CAPTION in columns:
        raise ManifestInvalid(f"line {header_line}: give 'original_prompt' or 'caption', not both")
    return Table(columns, rows, errors)


def _row_fields(row: dict[str, str], columns: dict[str, str], line: int, errors: list[RowError]) -> dict[str, Any]:
    """The row's own request fields (condition labels, ``edit``, prompts), each bad cell an error."""
    fields: dict[str, Any] = {}
    findings: dict[str, int | None] = {}
    for condition in CONDITIONS:
        if condition in columns:
            try:
                findings |= normalize_labels({condition: row[columns[condition]]}, "findings")
            except InvalidInput as exc:
                errors.append(RowError(line=line, column=columns[condition], message=exc.message))
    if any(c in columns for c in CONDITIONS):
        fields["findings"] = findings
    cell = {name: row[spelling].strip() for name, spelling in columns.items()}
    if edit := cell.get(EDIT):
        try:
            fields["edit"] = parse_labels(edit, "edit")
        except InvalidInput as exc:
            errors.append(RowError(line=line, column=columns[EDIT], message=exc.message))
    if original := cell.get(ORIGINAL) or cell.get(CAPTION):
        fields["original_prompt"] = original
    if edit_prompt := cell.get(EDIT_PROMPT):
        fields["edit_prompt"] = edit_prompt
    return fields


def _column(field: str, columns: dict[str, str]) -> str:
    """Where a request field came from: its manifest column if the file has one, else the form field."""
    if field == ORIGINAL and CAPTION in columns:
        return columns[CAPTION]
    return columns.get(field, field)


def _path(row: dict[str, str], columns: dict[str, str], line: int) -> tuple[str, dict[str, str] | None] | RowError:
    """The row's clean path (and its reference, for a row naming a study), or what is wrong with it."""
    if PATH in columns:
        try:
            return clean_path(row[columns[PATH]].strip()), None
        except InvalidPath as exc:
            return RowError(line=line, column=columns[PATH], message=f"the image's path {exc}")
    reference = {field: row[columns[field]].strip() for field in REFERENCE_FIELDS if field in columns}
    reference = {field: uid for field, uid in reference.items() if uid}
    for field, uid in reference.items():
        if not is_uid(uid):
            return RowError(line=line, column=columns[field], message="not a DICOM UID (digits and dots, 64 at most)")
    if STUDY not in reference:
        return RowError(line=line, column=columns[STUDY], message="empty: each row names a study")
    return reference_path(tuple(reference.values())), reference


def _paths(table: Table, errors: list[RowError]) -> list[tuple[int, str, dict[str, str] | None, dict[str, str]]]:
    """Each row with its clean path (and reference), once; bad, repeated and clashing paths are errors."""
    column = table.columns.get(PATH) or table.columns[STUDY]
    rows: list[tuple[int, str, dict[str, str] | None, dict[str, str]]] = []
    first_line: dict[str, int] = {}
    for line, row in table.rows:
        found = _path(row, table.columns, line)
        if isinstance(found, RowError):
            errors.append(found)
            continue
        path, reference = found
        if (first := first_line.setdefault(path, line)) != line:
            errors.append(
                RowError(line=line, column=column, message=f"{path!r} is also on line {first}: one row per image")
            )
            continue
        rows.append((line, path, reference, row))
    clashes = _clashes([(line, path) for line, path, _, _ in rows], column)
    errors.extend(clashes)
    refused = {error.line for error in clashes}
    return [row for row in rows if row[0] not in refused]


def read_manifest(data: bytes, base: EditRequest, tokenizer=None, with_mask: bool = False) -> Manifest:
    """Every row of the CSV ``data`` resolved over the batch's ``base`` request (its options, its
    ``edit`` labels or prompts), or the errors that stop the batch, by line; raises
    :class:`ManifestInvalid` when the file as a whole is unusable."""
    table = read_rows(data)
    columns = table.columns
    base_fields = base.model_dump(exclude_none=True)
    items: list[PlannedItem] = []
    errors: list[RowError] = list(table.errors)
    for line, path, reference, row in _paths(table, errors):
        before = len(errors)
        fields = _row_fields(row, columns, line, errors)
        if len(errors) > before:
            continue
        try:
            request = EditRequest.model_validate({**base_fields, **fields})
            edit = resolve(request, tokenizer, with_mask)
            items.append(PlannedItem(line=line, path=path, request=request, edit=edit, reference=reference))
        except NothingToEdit as exc:
            skipped = f"the edit {exc.message}"
            items.append(PlannedItem(line=line, path=path, request=request, skipped=skipped, reference=reference))
        except InvalidInput as exc:
            errors.append(RowError(line=line, column=_column(exc.field, columns), message=exc.message))
        except ValidationError as exc:
            for e in exc.errors():
                field = str(e["loc"][0]) if e["loc"] else ""
                message = e["msg"].removeprefix("Value error, ")
                errors.append(RowError(line=line, column=_column(field, columns), message=message))
    return Manifest(items=items, errors=sorted(errors, key=lambda e: e.line), by_reference=STUDY in columns)
