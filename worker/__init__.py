"""The worker: a long-lived RQ process that holds the model and runs jobs with the engine."""
