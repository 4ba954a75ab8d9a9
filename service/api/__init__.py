"""The HTTP API (FastAPI): validates requests and enqueues jobs. Never imports torch or the worker."""
