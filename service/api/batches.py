"""The API's side of batches: check a ZIP and its manifest whole, enqueue one job per row, report
on the batch, cancel it, and stream its dataset. Torch-free.

Nothing is enqueued until every row has passed: its cells, its resolved edit, and its image (found
in the ZIP and checked as a single upload is). A batch must fit in the queue whole: above
``max_queue_depth`` queued jobs it is refused with 503 and Retry-After, never half enqueued.
"""

from __future__ import annotations

import hashlib
import io
import re
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO

from rq.job import Job

from models.imaging.dicom import is_dicom
from models.request.manifest import InvalidPath, Manifest, PlannedItem, RowError
from models.request.report import EditReport
from service.api.archive import Archive
from service.api.errors import IdempotencyConflict, ManifestErrors, NotCancelable, QueueFull
from service.api.schemas import BatchItemStatus, BatchLinks, BatchStatus, BatchSummary
from service.api.store import STATES, JobStore
from service.api.uploads import NOT_DICOM, UploadRejected, check_image
from service.contract import metrics
from service.contract.batches import (
    BatchItem,
    BatchRecord,
    check_completed,
    ended_counts,
    links,
    load_batch,
    save_batch,
)
from service.contract.blobs import BlobMissing, file_blob
from service.contract.datasets import MANIFEST, ManifestLine, counterfactual_name, dataset_names, manifest_csv
from service.contract.jobs import JobRequest, fetch_many, read_failure
from service.contract.keys import batch_cancel_key, batches_index_key
from service.contract.pacs import Pacs, PacsError
from service.contract.recovery import recover_lost_jobs, worker_lost

BATCH_ID = re.compile(r"[0-9a-f]{32}")
STORED = (".png", ".npy", ".dcm")
"""Already compressed, or not worth it: stored as they are in the dataset ZIP."""


def content_digest(*parts: bytes | BinaryIO) -> str:
    """A content hash of the request for Idempotency-Key (files are read in chunks, then rewound)."""
    sha = hashlib.sha256()
    for part in parts:
        if isinstance(part, bytes):
            sha.update(part)
            continue
        part.seek(0)
        while chunk := part.read(1 << 20):
            sha.update(chunk)
        part.seek(0)
    return sha.hexdigest()


class Spool:
    """Instances retrieved from a PACS for a batch, one after another in one temporary file, until
    they are enqueued: memory stays at one instance, whatever the batch's size."""

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile()
        self.parts: dict[int, tuple[int, int]] = {}

    def add(self, line: int, data: bytes) -> None:
        self.parts[line] = (self.file.seek(0, io.SEEK_END), len(data))
        self.file.write(data)

    def read(self, line: int) -> bytes:
        offset, size = self.parts[line]
        self.file.seek(offset)
        return self.file.read(size)

    def close(self) -> None:
        self.file.close()


@dataclass
class RowImages:
    """Where each row's image is: an entry of the batch's ZIP, or an instance retrieved from its PACS."""

    archive: Archive | None
    entries: dict[int, str]
    spool: Spool

    def read(self, line: int) -> bytes:
        return self.spool.read(line) if line in self.spool.parts else self.archive.read(self.entries[line])


def check_rows(
    manifest: Manifest, archive: Archive | None, pacs: Pacs | None, max_pixels: int, store_to: bool
) -> RowImages:
    """Each row's image, every one decoded once, as a single upload is: its entry in the ZIP, or
    for a row naming a study its frontal radiograph, retrieved from ``pacs`` (by the same rule as
    a single submission). Raises :class:`ManifestErrors` listing every bad row (its own cells, its
    path or study, its image; with ``store_to``, an image that is not DICOM). Over-limit entries
    stay a 413; a PACS that is down is a 503. Paths and the names of their outputs were checked by
    the manifest's reader, by the rule the archive's names follow too."""
    errors: list[RowError] = list(manifest.errors)
    images = RowImages(archive, {}, Spool())
    try:
        for item in manifest.items:
            if item.reference is not None:
                column = "study_uid"
                try:
                    ref = pacs.frontal(
                        item.reference[column], item.reference.get("series_uid"), item.reference.get("sop_uid")
                    )
                    data = pacs.retrieve(ref)
                except PacsError as exc:
                    errors.append(RowError(line=item.line, column=exc.field, message=exc.message))
                    continue
            else:
                column = "Path"
                name = archive.find(item.path)
                if name is None:
                    errors.append(RowError(line=item.line, column=column, message=f"no file {item.path!r} in the ZIP"))
                    continue
                data = archive.read(name)
                images.entries[item.line] = name
            try:
                check_image(data, max_pixels)
            except UploadRejected as exc:
                if exc.status_code == 413 and exc.field == "images":
                    raise
                errors.append(RowError(line=item.line, column=column, message=f"{item.path}: {exc.message}"))
                continue
            if store_to and not is_dicom(data):
                message = f"{item.path}: store_to {NOT_DICOM}"
                errors.append(RowError(line=item.line, column=column, message=message))
            if item.reference is not None:
                images.spool.add(item.line, data)
    except BaseException:  # a PACS that is down, an archive over its limits
        images.spool.close()
        raise
    if errors:
        images.spool.close()
        raise ManifestErrors(sorted(errors, key=lambda e: e.line))
    if archive is not None:
        archive.read_bytes = 0
    return images


@dataclass
class BatchStore:
    jobs: JobStore

    @property
    def redis(self):
        return self.jobs.redis

    @property
    def settings(self):
        return self.jobs.settings

    def submit(
        self,
        images: RowImages,
        items: list[PlannedItem],
        pacs: dict[str, str | None],
        owner: str,
        webhook: str | None,
        client_key: str | None,
        digest: str,
    ) -> BatchRecord:
        """Enqueue a job per applicable row and keep the batch; a repeat of an Idempotency-Key with
        the same content returns the first batch. ``pacs`` holds the batch's ``source`` (for rows
        naming a study) and ``store_to``."""
        batch_id = uuid.uuid4().hex
        client_key = None if client_key is None else f"batch:{client_key}"
        if client_key is not None and (existing := self.jobs.claim(owner, client_key, batch_id, digest)) is not None:
            record = load_batch(self.redis, existing)
            if record is None:
                raise IdempotencyConflict
            return record
        to_run = [item for item in items if item.edit is not None]
        batch_items: list[BatchItem] = []
        try:
            room = self.jobs.queue_room()
            if len(to_run) > room:
                message = f"the queue has room for {max(room, 0)} jobs and the batch needs {len(to_run)}; retry later"
                raise QueueFull(self.settings.retry_after_s, message)
            self.jobs.check_storage(len(to_run) + 1)
            for item in items:
                if item.edit is None:
                    batch_items.append(BatchItem(line=item.line, path=item.path, skipped=item.skipped))
                    continue
                job_id = uuid.uuid4().hex
                reference = {**item.reference, "source": pacs["source"]} if item.reference else {}
                fields = {**item.request.model_dump(), **reference, "store_to": pacs["store_to"]}
                job_request = JobRequest.model_validate(fields)
                self.jobs.add(job_id, images.read(item.line), job_request, item.edit, owner, batch=batch_id)
                batch_items.append(BatchItem(line=item.line, path=item.path, job_id=job_id))
        except Exception:  # refused on the way (storage full): the batch is taken back whole
            for item in batch_items:
                if item.job_id is not None:
                    self.jobs.remove(item.job_id)
            self.jobs.release(owner, client_key)
            raise
        record = BatchRecord(id=batch_id, owner=owner, created_at=datetime.now(UTC), items=batch_items, webhook=webhook)
        save_batch(self.redis, self.settings, record)
        with self.redis.pipeline() as pipe:
            pipe.zadd(batches_index_key(owner), {batch_id: time.time()})
            pipe.expire(batches_index_key(owner), self.settings.job_ttl_s)
            pipe.execute()
        metrics.count(self.redis, "batches")
        metrics.count(self.redis, "batch_items", "submitted", len(record.job_ids))
        metrics.count(self.redis, "batch_items", "skipped", len(items) - len(record.job_ids))
        check_completed(self.redis, self.settings, record)
        return record

    def record(self, batch_id: str, owner: str) -> BatchRecord | None:
        """The batch, or None if it does not exist (expired) or belongs to another tenant."""
        if not BATCH_ID.fullmatch(batch_id):
            return None
        record = load_batch(self.redis, batch_id)
        return record if record is not None and record.owner == owner else None

    def summary(self, record: BatchRecord) -> BatchSummary:
        ended = sum(ended_counts(self.redis, record.id).values()) + len(record.items) - len(record.job_ids)
        return BatchSummary(
            id=record.id,
            status="completed" if ended >= len(record.items) else "running",
            created_at=record.created_at,
            total=len(record.items),
            ended=ended,
            links=BatchLinks(**links(record.id)),
        )

    def list(self, owner: str, limit: int, offset: int) -> tuple[list[BatchSummary], int]:
        """A page of the owner's batches, newest first; expired batches leave the index."""
        index = batches_index_key(owner)
        out = []
        for raw in self.redis.zrevrange(index, offset, offset + limit - 1):
            record = load_batch(self.redis, raw.decode())
            if record is None:
                self.redis.zrem(index, raw)
            else:
                out.append(self.summary(record))
        return out, int(self.redis.zcard(index))

    def _jobs(self, record: BatchRecord) -> dict[str, Job | None]:
        """The batch's jobs by id (None once expired), after re-queueing those of dead workers."""
        jobs = dict(zip(record.job_ids, fetch_many(self.redis, record.job_ids), strict=True))
        if any(job is not None and worker_lost(self.redis, self.settings, job) for job in jobs.values()):
            recover_lost_jobs(self.redis, self.settings)
            jobs = dict(zip(record.job_ids, fetch_many(self.redis, record.job_ids), strict=True))
        return jobs

    def _item(self, item: BatchItem, job: Job | None) -> tuple[BatchItemStatus, EditReport | None]:
        if item.job_id is None:
            return BatchItemStatus(line=item.line, path=item.path, status="skipped", reason=item.skipped), None
        if job is None:
            status = BatchItemStatus(
                line=item.line, path=item.path, status="failed", job_id=item.job_id, reason="the job has expired",
                error_code="expired",
            )  # fmt: skip
            return status, None
        state = STATES.get(job.get_status(refresh=False), "queued")
        status = BatchItemStatus(
            line=item.line, path=item.path, status=state, job_id=item.job_id, links={"self": f"/jobs/{item.job_id}"}
        )
        if state == "succeeded" and job.return_value() is None:
            update = {"status": "failed", "reason": "the job's result has expired", "error_code": "expired"}
            return status.model_copy(update=update), None
        if state == "succeeded":
            report = EditReport.model_validate(job.return_value())
            files = {name: f"/jobs/{item.job_id}/files/{name}" for name in report.file_names}
            update = {"s_clip": report.s_clip, "passed": report.passed, "links": {**status.links, **files}}
            return status.model_copy(update=update), report
        if state == "failed":
            error = read_failure(job)
            return status.model_copy(update={"reason": error.message, "error_code": error.code.value}), None
        return status, None

    def items(self, record: BatchRecord) -> Iterator[tuple[BatchItemStatus, EditReport | None]]:
        jobs = self._jobs(record)
        for item in record.items:
            yield self._item(item, jobs.get(item.job_id) if item.job_id else None)

    def status(self, record: BatchRecord) -> BatchStatus:
        statuses = [status for status, _ in self.items(record)]
        counts = dict.fromkeys(("queued", "running", "succeeded", "failed", "canceled", "skipped"), 0)
        errors: dict[str, int] = {}
        for s in statuses:
            counts[s.status] += 1
            if s.error_code:
                errors[s.error_code] = errors.get(s.error_code, 0) + 1
        ended = len(statuses) - counts["queued"] - counts["running"]
        return BatchStatus(
            **self.summary(record).model_dump(exclude={"status", "ended"}),
            status="completed" if ended == len(statuses) else "running",
            ended=ended,
            counts=counts,
            progress=ended / max(len(statuses), 1),
            errors=errors,
            passed=sum(1 for s in statuses if s.passed),
            items=statuses,
        )

    def cancel(self, record: BatchRecord) -> BatchStatus:
        """Cancel every job not yet ended: queued ones are removed, running ones stop within a step.
        The batch is flagged first, so no worker starts one of its jobs while they are gone through."""
        self.redis.set(batch_cancel_key(record.id), 1, ex=self.settings.job_ttl_s)
        for job_id in record.job_ids:
            try:
                self.jobs.cancel(job_id, record.owner)
            except NotCancelable:
                continue
        return self.status(record)

    def dataset(self, record: BatchRecord, passed_only: bool) -> Iterator[bytes]:
        """The dataset ZIP, streamed: each succeeded item's files (with ``passed_only``, only those
        of items whose S_CLIP reached the threshold) copied from the blob store piece by piece,
        then ``manifest.csv`` with every row. Memory stays at a piece of a file, whatever the
        files' and the batch's size."""
        sink = _Chunks()
        lines = []
        with zipfile.ZipFile(sink, "w", allowZip64=True) as archive:
            for status, report in self.items(record):
                line = ManifestLine(
                    line=status.line,
                    path=status.path,
                    status=status.status,
                    reason=status.reason or "",
                    error_code=status.error_code or "",
                    job_id=status.job_id or "",
                )
                if report is not None:
                    line = line.model_copy(
                        update={
                            "original_prompt": report.original_prompt,
                            "edit_prompt": report.edit_prompt,
                            "s_clip": report.s_clip,
                            "passed": report.passed,
                            "chosen_self_replace": report.chosen_self_replace,
                        }
                    )
                    if report.passed or not passed_only:
                        names = _dataset_names(status.path, report.file_names)
                        for name, arcname in names.items():
                            try:
                                size, chunks = self.jobs.blobs.open(file_blob(status.job_id, name))
                            except BlobMissing:
                                continue
                            with archive.open(_entry(arcname), "w", force_zip64=size >= zipfile.ZIP64_LIMIT) as entry:
                                for chunk in chunks:
                                    entry.write(chunk)
                                    yield sink.take()
                            yield sink.take()
                        line = line.model_copy(update={"counterfactual": counterfactual_name(names)})
                lines.append(line)
            _write(archive, MANIFEST, manifest_csv(lines))
        yield sink.take()


def _dataset_names(path: str, file_names: list[str]) -> dict[str, str]:
    """The item's names in the dataset; none for a path outside the name rule (a batch accepted
    before the rule held, still in Redis for its TTL), so no entry can lead outside the folder."""
    try:
        return dataset_names(path, file_names)
    except InvalidPath:
        return {}


def _entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=time.gmtime()[:6])
    info.compress_type = zipfile.ZIP_STORED if name.endswith(STORED) else zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    return info


def _write(archive: zipfile.ZipFile, name: str, content: bytes) -> None:
    archive.writestr(_entry(name), content)


class _Chunks:
    """A write-only, unseekable file: zipfile writes into it, the stream takes what it wrote."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data
