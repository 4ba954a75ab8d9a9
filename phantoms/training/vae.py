"""The VAE stages: the whole VAE on crops, then its decoder alone on whole images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

import models.weights.offline  # noqa: F401  (before diffusers/transformers)
from models.atomic import write_aside
from models.training.stopping import StopSwitch
from phantoms import architecture
from phantoms.recipe import StageRecipe
from phantoms.training.data import SIZE, batch_indices
from phantoms.training.stage import Stage


def train_vae(
    images: np.ndarray, work: Path, out: Path, recipe: StageRecipe, device: torch.device, stop: StopSwitch | None = None
) -> float:
    torch.manual_seed(1)
    vae = architecture.vae().to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.lr, weight_decay=0.0)
    rng = np.random.default_rng(2)
    stage = Stage("vae", work, {"vae": vae}, opt, recipe, rng, stop)

    def step_fn(step: int) -> float:
        idx = batch_indices(images, rng, recipe.batch)
        y0, x0 = rng.integers(0, SIZE - 64, 2)
        x = torch.from_numpy(images[idx, y0 : y0 + 64, x0 : x0 + 64]).to(device).float()[:, None] / 127.5 - 1
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(rec, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    loss = stage.run(step_fn)
    vae.eval()
    with torch.no_grad():
        x = torch.from_numpy(images[:256]).to(device).float()[:, None] / 127.5 - 1
        std = torch.cat([vae.encode(b).latent_dist.mean for b in x.split(64)]).std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.to("cpu").save_pretrained(out / "vae")
    return loss


def train_decoder(
    images: np.ndarray, work: Path, out: Path, recipe: StageRecipe, device: torch.device, stop: StopSwitch | None = None
) -> float:
    """Fine-tune the VAE's decoder alone on whole images, decoding the posterior mean as an edit does.

    The VAE stage's decoder learns from sampled latents of 64x64 crops and stays blurred: a 1-px
    lead comes back as a faint wide band, and the residual output turns that into a bright core
    and a dark rim around a removed lead even for a perfect edit. The encoder is frozen, so the
    latent space, and every stage trained on it, is unchanged (the same idea as Stable Diffusion's
    fine-tuned ft-MSE decoder).
    """
    loaded = AutoencoderKL.from_pretrained(out / "vae")
    vae = architecture.vae()  # a fresh config: from_pretrained's records the local path it was read from
    vae.load_state_dict(loaded.state_dict())
    vae.register_to_config(scaling_factor=loaded.config.scaling_factor)
    vae.to(device).requires_grad_(False)
    trained = {"decoder": vae.decoder, "post_quant_conv": vae.post_quant_conv}
    for module in trained.values():
        module.requires_grad_(True)
    params = [p for module in trained.values() for p in module.parameters()]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    rng = np.random.default_rng(6)
    stage = Stage("decoder", work, trained, opt, recipe, rng, stop)

    def step_fn(step: int) -> float:
        x = torch.from_numpy(images[batch_indices(images, rng, recipe.batch)]).to(device).float()[:, None] / 127.5 - 1
        with torch.no_grad():
            latent = vae.encode(x).latent_dist.mean
        loss = F.l1_loss(vae.decode(latent).sample, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    loss = stage.run(step_fn)
    vae.to("cpu").eval()
    write_aside(out / "vae", vae.save_pretrained)
    return loss
