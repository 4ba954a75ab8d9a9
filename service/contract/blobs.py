"""Where inputs, masks and result files live: a blob store beside Redis, which keeps only the
queue, job records, progress and small JSON (a real-size study's files are tens of MB).

One URL picks the backend (``PRISM_BLOB_URL``): ``file:///path``, a directory (the quick start's
default under ``PRISM_HOME``; a volume the API and the workers share in Compose; a ReadWriteMany
volume in Kubernetes), or ``s3://bucket/prefix``, S3-compatible object storage (MinIO, Ceph RGW,
NetApp StorageGRID, AWS), its endpoint and region from ``PRISM_BLOB_ENDPOINT`` and
``PRISM_BLOB_REGION`` and its credentials from the ``AWS_*`` environment variables. Both go through
obstore (Python bindings of the Rust ``object_store`` crate): one small dependency with the same
streamed reads, multipart writes and listing for both backends, where fsspec's S3 backend brings
aiobotocore and botocore; a directory store writes each file aside and renames it, so a reader
never sees half a file.

Layout: ``jobs/<job id>/input``, ``jobs/<job id>/mask``, ``jobs/<job id>/files/<name>``. A job's
blobs go with its record: :func:`sweep` deletes those of every job Redis no longer has (its TTL
ran out, or it was never recorded because the API stopped between the upload and the enqueue).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import obstore
from obstore.exceptions import BaseError
from obstore.store import ObjectStore, from_url
from redis import Redis
from rq.job import Job

from service.contract.settings import Settings

log = logging.getLogger("prism.blobs")

CHUNK = 1 << 20
"""Bytes per piece of a streamed read."""
SWEEP_GRACE_S = 600
"""A job's blobs are kept this long after their last write even when Redis has no record of the
job: the API writes the input just before it enqueues the job."""
STORE_ERRORS = (BaseError, OSError)
"""What obstore raises when a store refuses or cannot be reached (a full disk is an OSError)."""


class StorageUnavailable(Exception):
    """The blob store refused a write or a read, or could not be reached."""


class BlobMissing(Exception):
    """No blob at that key: expired, swept or never written."""


def input_blob(job_id: str) -> str:
    return f"jobs/{job_id}/input"


def mask_blob(job_id: str) -> str:
    """The uploaded anatomy mask of a guided job, if there is one."""
    return f"jobs/{job_id}/mask"


def file_blob(job_id: str, name: str) -> str:
    """A result file of a job."""
    return f"jobs/{job_id}/files/{name}"


def job_of(key: str) -> str | None:
    """The job id a key belongs to (None for a key outside ``jobs/``)."""
    parts = key.split("/")
    return parts[1] if len(parts) >= 3 and parts[0] == "jobs" else None


def blob_url(settings: Settings) -> str:
    """The store's URL: ``PRISM_BLOB_URL``, else a directory under ``PRISM_HOME``."""
    return settings.blob_url or (Path(settings.home).expanduser().resolve() / "blobs").as_uri()


def open_store(settings: Settings) -> ObjectStore:
    url = blob_url(settings)
    if url.startswith("file://"):
        return from_url(url, mkdir=True)
    config = {}
    if settings.blob_endpoint:
        config["endpoint"] = settings.blob_endpoint
    if settings.blob_region:
        config["region"] = settings.blob_region
    http = bool(settings.blob_endpoint and settings.blob_endpoint.startswith("http://"))
    return from_url(url, config=config, client_options={"allow_http": http})


@dataclass
class BlobStore:
    """The few operations the service needs, with the store's failures as two exceptions."""

    store: ObjectStore

    @classmethod
    def from_settings(cls, settings: Settings) -> BlobStore:
        return cls(open_store(settings))

    def put(self, key: str, data: bytes | Iterable[bytes]) -> None:
        """Write a blob whole (pieces of an iterable are sent as a multipart upload)."""
        try:
            obstore.put(self.store, key, data)
        except STORE_ERRORS as exc:
            raise StorageUnavailable(f"could not write to the blob store ({type(exc).__name__})") from exc

    def get(self, key: str) -> bytes:
        return b"".join(self.open(key)[1])

    def open(self, key: str) -> tuple[int, Iterator[bytes]]:
        """The blob's size and its content in pieces of about :data:`CHUNK` bytes; raises at once
        when it is missing, not halfway through a response."""
        try:
            result = obstore.get(self.store, key)
        except FileNotFoundError as exc:
            raise BlobMissing(key) from exc
        except STORE_ERRORS as exc:
            raise StorageUnavailable(f"could not read from the blob store ({type(exc).__name__})") from exc
        return result.meta["size"], (bytes(chunk) for chunk in result.stream(min_chunk_size=CHUNK))

    def exists(self, key: str) -> bool:
        try:
            obstore.head(self.store, key)
        except FileNotFoundError:
            return False
        except STORE_ERRORS as exc:
            raise StorageUnavailable(f"could not read from the blob store ({type(exc).__name__})") from exc
        return True

    def delete(self, keys: Iterable[str]) -> None:
        """Delete the blobs that exist of ``keys``."""
        keys = list(keys)
        if not keys:
            return
        try:
            obstore.delete(self.store, keys)
        except FileNotFoundError:
            for key in keys:
                try:
                    obstore.delete(self.store, key)
                except FileNotFoundError:
                    continue
        except STORE_ERRORS as exc:
            raise StorageUnavailable(f"could not delete from the blob store ({type(exc).__name__})") from exc

    def jobs(self) -> Iterator[tuple[str, datetime, list[str]]]:
        """Every job that has blobs: its id, its newest blob's time, and its keys."""
        newest: dict[str, datetime] = {}
        keys: dict[str, list[str]] = {}
        for page in obstore.list(self.store, "jobs/"):
            for meta in page:
                job_id = job_of(meta["path"])
                if job_id is None:
                    continue
                keys.setdefault(job_id, []).append(meta["path"])
                newest[job_id] = max(newest.get(job_id, meta["last_modified"]), meta["last_modified"])
        for job_id, job_keys in keys.items():
            yield job_id, newest[job_id], job_keys


def sweep(redis: Redis, blobs: BlobStore, grace_s: float = SWEEP_GRACE_S) -> int:
    """Delete the blobs of every job Redis has no record of, once its newest blob is ``grace_s``
    old; returns how many jobs' blobs went. Redis unreachable stops the sweep (a missing record
    must mean the job is gone, not that Redis did not answer)."""
    cutoff = datetime.now(UTC) - timedelta(seconds=grace_s)
    candidates = [(job_id, keys) for job_id, newest, keys in blobs.jobs() if newest < cutoff]
    swept = 0
    for start in range(0, len(candidates), 500):
        chunk = candidates[start : start + 500]
        with redis.pipeline(transaction=False) as pipe:
            for job_id, _ in chunk:
                pipe.exists(Job.key_for(job_id))
            recorded = pipe.execute()
        for (_, keys), exists in zip(chunk, recorded, strict=True):
            if not exists:
                blobs.delete(keys)
                swept += 1
    if swept:
        log.info("swept the blobs of %d jobs that Redis no longer has", swept)
    return swept
