"""The PRISM service: the HTTP API (``api``), the job contract it shares with the workers
(``contract``) and the ``prism`` command line (``cli``, the composition root nothing imports)."""
