"""Configuration from the environment (``PRISM_*``), read by both the API and the workers."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.request.params import DtypeName
from service.contract.pacs import load_endpoints


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PRISM_", extra="ignore")

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        pattern=r"^(redis|rediss|unix)://",
        description="Redis holding the queue, job records and progress (redis://, rediss:// or unix://)",
    )
    queue_name: str = "prism"
    model_dir: str | None = Field(None, description="diffusers SD directory; unset: the built-in model")
    unet_weights: str | None = Field(None, description="fine-tuned UNet .safetensors loaded over model_dir")
    clip_model: str | None = Field(None, description="CLIP directory for scoring; unset: MODEL_DIR/clip")
    device: str | None = Field(
        None, pattern=r"^(cpu|cuda(:\d+)?)$", description="cpu, cuda or cuda:N; unset: cuda when available"
    )
    dtype: DtypeName | None = Field(None, description="the UNet's precision; unset: float16 on CUDA, float32 on CPU")
    cpu_threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads per worker; unset: torch's (one per core), which workers sharing the cores "
        "thrash with (prism up gives each its share)",
    )
    classifier: str | None = Field(
        None, description="finding classifier (.safetensors with its .json) for the guided method; unset: MODEL_DIR's"
    )
    inversion_cache_dir: str | None = Field(
        "~/.cache/prism/inversions",
        description="directory of cached inversions, shared by the workers of one host; empty: no cache",
    )
    inversion_cache_max_bytes: int = Field(
        2 * 1024**3, ge=0, description="the cache's size bound; least recently used inversions go first"
    )
    blob_url: str | None = Field(
        None,
        description="where inputs and result files live: file:///absolute/path (a directory) or "
        "s3://bucket[/prefix] (S3-compatible storage); unset: a directory under PRISM_HOME",
    )
    blob_endpoint: str | None = Field(
        None,
        pattern=r"^https?://[^/\s]+/?$",
        description="an S3-compatible store's endpoint, e.g. https://minio.hospital.local:9000; unset: AWS's",
    )
    blob_region: str | None = Field(None, description="the S3 store's region; unset: AWS_REGION's, else us-east-1")
    pacs_file: str | None = Field(
        None,
        description="TOML file of the PACS endpoints requests may name (source, store_to): DICOMweb URL with its auth "
        "and CA bundle, and/or a DICOM peer; unset: none",
    )
    pacs_retries: int = Field(
        4, ge=0, le=10, description="how often a worker tries again to store a job's outputs into a PACS (store_to)"
    )
    pacs_retry_first_s: float = Field(
        2.0, gt=0, description="the first store retry waits this long, each next one twice as long (4 tries: 30 s)"
    )
    blob_sweep_s: int = Field(
        300, ge=10, description="how often a worker deletes the blobs of jobs Redis no longer has (one per period)"
    )
    job_ttl_s: int = Field(24 * 3600, ge=60, description="how long inputs, results and failures are kept")
    job_timeout_s: int = Field(3600, ge=1, description="a job running longer fails with code 'timeout'")
    max_upload_bytes: int = Field(
        80 * 1024 * 1024, ge=1024, description="request body limit: a 16-bit 4096x4096 X-ray is 32 MiB raw"
    )
    max_image_pixels: int = Field(4096 * 4096, ge=64 * 64)
    retry_after_s: int = Field(2, ge=1, description="Retry-After of 202 and 503 answers")
    worker_heartbeat_s: int = Field(10, ge=1, description="worker heartbeat period; a worker is dead after 3 missed")
    worker_heartbeat_file: str | None = Field(
        None,
        description="a file the worker touches at each heartbeat Redis took, for an exec probe "
        "(prism worker-probe, as Kubernetes runs it); unset: none",
    )
    worker_pack: int = Field(
        1,
        ge=1,
        le=64,
        description="jobs a worker runs as one pack: with a job it takes up to this many minus one more queued "
        "jobs that can share its passes; size it to the GPU's memory",
    )
    compile: Literal["off", "compile", "cudagraph"] = Field(
        "off",
        description="the UNet of inversion and null-text: 'compile' (torch.compile), 'cudagraph' (torch.compile "
        "with CUDA graphs, CUDA only), warmed at worker start; eager with a log line where unavailable",
    )
    max_requeues: int = Field(1, ge=0, description="times a job whose worker died is re-queued before it fails")
    stop_grace_s: int = Field(
        120,
        ge=0,
        description="a stopping worker's jobs have this long to finish (a faithful GPU job takes under a minute), "
        "then go back to the queue for the next worker",
    )
    max_queue_depth: int = Field(
        500, ge=1, description="above this many queued jobs, POST answers 503 (a batch must fit whole)"
    )
    batch_max_items: int = Field(500, ge=1, description="rows of one batch's manifest (413 above)")
    batch_max_upload_bytes: int = Field(
        1024**3, ge=1024, description="request body limit of POST /batches (the ZIP and the manifest)"
    )
    batch_max_uncompressed_bytes: int = Field(
        2 * 1024**3, ge=1024, description="what one batch's ZIP may decompress to, all files together (413 above)"
    )
    auth: Literal["on", "off"] = Field("on", description="'off' only for local use: no API keys, one tenant")
    api_keys_file: str | None = Field(None, description="file of 'name:sha256(key)' lines (prism keys add NAME)")
    rate_limit_per_minute: int = Field(
        30, ge=1, description="submissions per API key in any 60-second window (429 above)"
    )
    home: str = Field("~/.cache/prism", description="the quick start's Redis data and, by default, its blobs")
    webhook_queue_name: str = "prism-webhooks"
    webhook_secret: str | None = Field(
        None, description="whsec_ secret signing webhooks when API keys are off (with keys: each key's own)"
    )
    webhook_retry_first_s: float = Field(
        10.0, gt=0, description="first webhook retry after this; each next one waits twice as long (7 retries)"
    )
    webhook_allow_private: bool = Field(
        False, description="allow webhook URLs on loopback, link-local and private addresses (tests, closed networks)"
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="origins allowed to call the API from a browser (CORS); empty: none"
    )
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per log line")

    @field_validator(
        "model_dir", "unet_weights", "clip_model", "classifier", "inversion_cache_dir", "api_keys_file",
        "webhook_secret", "worker_heartbeat_file", "blob_url", "blob_endpoint", "blob_region", "pacs_file",
        mode="before",
    )  # fmt: skip
    @classmethod
    def _empty_means_none(cls, value: str | None) -> str | None:
        """An empty value is unset: how a container clears a path its image sets (Compose cannot unset)."""
        return value or None

    @field_validator("pacs_file")
    @classmethod
    def _usable_endpoints(cls, value: str | None) -> str | None:
        """A file whose every endpoint can be used (``service.contract.pacs``): else the entry at fault."""
        if value is not None:
            load_endpoints(value)
        return value

    @field_validator("blob_url")
    @classmethod
    def _blob_backend(cls, value: str | None) -> str | None:
        """A URL of a backend the blob store has (``service.contract.blobs``)."""
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme == "file" and parts.path.startswith("/") and not parts.netloc:
            return value
        if parts.scheme == "s3" and parts.netloc and not parts.query:
            return value
        raise ValueError("must be file:///absolute/path or s3://bucket[/prefix]")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
