"""The PRISM editing engine: a pure library (no HTTP, no queue), in packages by role.

``request`` (torch-free: what a request is and how it is checked), ``imaging`` (images in and
out), ``diffusion`` (components, DDIM, inversion, attention control, editing), ``methods`` (prism,
sdedit, guided behind one interface), ``scoring`` (S_CLIP, the finding classifier), ``weights``
(tiny and built-in models), ``training`` (fine-tuning), ``evaluation`` (quality and speed), and
``pipeline``, the whole counterfactual.
"""
