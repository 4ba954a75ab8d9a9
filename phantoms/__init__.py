"""Synthetic chest-X-ray phantoms with true counterfactuals, and the built-in model trained on them."""
