"""Train the built-in model on phantoms: VAE, text-conditioned UNet, CLIP scorer, classifier.

One module per stage (``data``, ``vae``, ``diffusion``, ``attention``, ``scorers``), the resumable
loop they share (``stage``) and the run of them all (``builtin``).

The diffusion stage is PRISM's Algorithm 1 as any user runs it (:class:`models.training.finetune.Finetuner`,
``prism finetune``): the phantoms are written as PNGs with a captions table, and the UNet and
text encoder of a base directory (the trained VAE, the rest freshly initialised) are fine-tuned on
them. The phantom-specific parts (VAE, attention supervision, CLIP scorer, classifier) are here.

Seeded and resumable: each stage checkpoints to ``work`` (weights, optimiser and random state,
so the steps redone after a resume are the ones an uninterrupted run takes) and is skipped once
its outputs exist, so ``prism train-builtin`` can be interrupted and run again. It writes every
file of the shipped model (``models/assets/builtin``): the components in the diffusers/transformers
layout that ``load_bundle`` reads, ``local_blend.json``, ``training.json`` (the recipe it ran, the device,
per-stage seconds and final losses, held-out measurements) and a ``MODEL_CARD.md`` rendered from it.
"""
