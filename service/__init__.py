"""The PRISM HTTP API (FastAPI). Never imports torch: the engine runs in workers."""
