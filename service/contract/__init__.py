"""The job contract between the HTTP API and the workers: torch-free, imports neither side.

``jobs`` (what a job carries, how it is enqueued, how it ends), ``keys`` (Redis key names),
``settings`` (configuration both sides read) and ``recovery`` (re-queueing the jobs of dead
workers, run by both sides). The result a job returns is the engine's
:class:`~models.request.report.EditReport`.
"""
