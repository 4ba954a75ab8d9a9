"""The PRISM editing engine: a pure library (no HTTP, no queue).

Modules that need torch import it themselves; ``words``, ``params``, ``validation`` and
``tokenizer`` do not, so the API process can validate requests without loading torch.
"""
