"""The counterfactual methods behind one interface (:class:`~models.methods.base.Method`):
``prism`` (inversion and prompt-to-prompt), ``sdedit`` and ``guided`` (classifier guidance)."""
