"""Measuring the engine: edit and image quality against true counterfactuals, and speed per phase."""
