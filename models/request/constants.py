"""Numbers fixed by the models PRISM builds on (Stable Diffusion v1.5, CLIP), declared once. Torch-free."""

TOKEN_WINDOW = 77
"""CLIP's text window: start token, up to 75 prompt tokens, end token (and padding)."""

CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
"""CLIP's image normalisation (OpenAI ViT-L/14), used when a CLIP directory does not state its own."""

SD15_LATENT_SCALE = 0.18215
"""SD v1.5's VAE scaling factor: latent = posterior mean x scale (used when a VAE config omits it)."""
