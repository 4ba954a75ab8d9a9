"""Fine-tuning (PRISM's Algorithm 1) and what makes a long run safe to stop: a stop switch for
SIGINT/SIGTERM (checkpoints are written with :mod:`models.atomic`)."""
