"""The PRISM editing engine: a pure library (no HTTP, no queue)."""
