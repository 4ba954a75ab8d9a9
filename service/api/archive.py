"""The ZIP of a batch, opened defensively: nothing in it is trusted before it is checked.

* entries are counted, and their declared sizes summed, before anything is decompressed;
* each entry is read with a bound (a declared size can lie), and the bytes read are summed;
* entry names follow the manifest's name rule (:func:`~models.request.manifest.clean_path`: NFC,
  ``/`` between parts), so ``Path`` cells match them as archivers write them; a name the rule
  refuses (absolute, ``..``, a drive letter, a control character) or a link is refused, so a name
  can never become a path outside the batch when the dataset is unpacked;
* encrypted entries are refused (there is no password to give).

Over a limit is 413, a bad name or a broken archive 422, both naming the ``images`` field.
"""

from __future__ import annotations

import contextlib
import stat
import zipfile
from dataclasses import dataclass, field
from typing import BinaryIO

from models.request.manifest import InvalidPath, clean_path
from service.api.uploads import UploadRejected

FIELD = "images"
UTF8_NAME = 0x800
"""The general-purpose flag bit saying an entry's name is UTF-8; without it, zipfile reads the name as CP437."""


@dataclass(frozen=True)
class ArchiveLimits:
    max_entries: int
    max_entry_bytes: int
    max_total_bytes: int


def _rejected(status: int, message: str, kind: str = "invalid_archive") -> UploadRejected:
    return UploadRejected(status, message, kind, field=FIELD)


def _is_link(info: zipfile.ZipInfo) -> bool:
    return info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16)


def entry_name(info: zipfile.ZipInfo) -> str:
    """The entry's name by the manifest's rule; raises InvalidPath. A name without the UTF-8 flag
    whose bytes are UTF-8 is read as UTF-8: macOS and other archivers write such names unflagged."""
    name = info.filename
    if not info.flag_bits & UTF8_NAME:
        with contextlib.suppress(UnicodeError):
            name = name.encode("cp437").decode("utf-8")
    return clean_path(name)


@dataclass
class Archive:
    """A checked ZIP: its files by name. :meth:`read` decompresses one within the limits."""

    zip: zipfile.ZipFile
    limits: ArchiveLimits
    files: dict[str, zipfile.ZipInfo]
    read_bytes: int = field(default=0)

    def find(self, path: str) -> str | None:
        """The entry a manifest path (a clean one) names: as written, else without its leading folders,
        one at a time (a CheXpert ``Path`` starts with the dataset's own folder, which the ZIP may not have)."""
        parts = path.split("/")
        for start in range(len(parts)):
            name = "/".join(parts[start:])
            if name in self.files:
                return name
        return None

    def read(self, name: str) -> bytes:
        info = self.files[name]
        try:
            with self.zip.open(info) as entry:
                data = entry.read(self.limits.max_entry_bytes + 1)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, OSError, EOFError) as exc:
            raise _rejected(422, f"entry {name!r} cannot be decompressed ({type(exc).__name__})") from None
        if len(data) > self.limits.max_entry_bytes:
            raise _rejected(413, f"{name!r} exceeds {self.limits.max_entry_bytes} bytes", "too_large")
        self.read_bytes += len(data)
        if self.read_bytes > self.limits.max_total_bytes:
            message = f"the archive decompresses to more than {self.limits.max_total_bytes} bytes"
            raise _rejected(413, message, "too_large")
        return data


def open_archive(file: BinaryIO, limits: ArchiveLimits) -> Archive:
    """The archive's directory, checked: see the module docstring."""
    try:
        archive = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError, ValueError):
        raise _rejected(422, "not a ZIP archive (or a truncated one)") from None
    infos = [info for info in archive.infolist() if not info.is_dir()]
    if len(infos) > limits.max_entries:
        raise _rejected(413, f"the archive has {len(infos)} files; the limit is {limits.max_entries}", "too_large")
    declared = sum(info.file_size for info in infos)
    if declared > limits.max_total_bytes:
        message = f"the archive decompresses to {declared} bytes; the limit is {limits.max_total_bytes}"
        raise _rejected(413, message, "too_large")
    files: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        try:
            name = entry_name(info)
        except InvalidPath as exc:
            raise _rejected(422, f"entry {info.filename!r} is not a plain relative file name: it {exc}") from None
        if _is_link(info):
            raise _rejected(422, f"entry {name!r} is not a plain relative file name: it is a link")
        if info.flag_bits & 0x1:
            raise _rejected(422, f"entry {name!r} is encrypted")
        if info.file_size > limits.max_entry_bytes:
            raise _rejected(413, f"{name!r} exceeds {limits.max_entry_bytes} bytes", "too_large")
        if name in files:
            raise _rejected(422, f"entry {name!r} appears twice")
        files[name] = info
    return Archive(archive, limits, files)
