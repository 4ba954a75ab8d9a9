"""The diffusion machinery PRISM is built from: the model components and their loader (and the
random-weight models built from configs, ``tiny``), the DDIM sampler, inversion (DDIM, null-text,
negative-prompt, direct) and its cache, prompt-to-prompt attention control with its token maps,
and the controlled denoising loop."""
