"""The phantom data every stage trains on: rendered images and findings, finding regions, the
training set written as ``prism finetune`` reads any data set, and the base model directory."""

from __future__ import annotations

import csv
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import models.weights.offline  # noqa: F401  (before diffusers/transformers)
from models.atomic import write_aside
from models.diffusion.ddim import make_scheduler
from models.request.tokenizer import ASSETS
from phantoms import architecture
from phantoms.captions import explicit_caption, prism_caption, typed_caption
from phantoms.recipe import TRAIN_SEEDS
from phantoms.render import FINDINGS, Findings, region_fractions, training_phantom

SIZE = architecture.SIZE


def _pool(workers: int) -> ProcessPoolExecutor:
    """Rendering is per-seed numpy work: spawned processes import only :mod:`phantoms.render`."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def build_dataset(
    n: int, size: int = SIZE, seeds: range = TRAIN_SEEDS, workers: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, size, size) uint8 and findings (n, 3) for the first n anatomies of ``seeds``."""
    images = np.empty((n, size, size), np.uint8)
    labels = np.empty((n, len(FINDINGS)), np.float32)
    with _pool(workers) as pool:
        for i, (image, findings) in enumerate(pool.map(training_phantom, seeds[:n], repeat(size), chunksize=64)):
            images[i], labels[i] = image, findings.as_vector()
    return images, labels


def build_regions(n: int, size: int = SIZE, side: int = 16, workers: int = 1) -> np.ndarray:
    """Area fraction (n, 3, side, side) of each finding's region for training seeds 0..n-1."""
    with _pool(workers) as pool:
        return np.stack(list(pool.map(region_fractions, range(n), repeat(size), repeat(side), chunksize=16)))


CAPTIONS = "captions.csv"


def write_phantoms(images: np.ndarray, labels: np.ndarray, directory: Path) -> Path:
    """The training set as ``prism finetune`` reads any data set: PNGs and a ``Path,caption`` table.

    Four rows per image, so that a run's draw among them weighs the wordings as
    :func:`phantoms.captions.training_caption` does: the explicit form twice, the PRISM template
    once, one typed variant. The table is renamed into place last, so its presence means done.
    """
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)

    def write(partial: Path) -> None:
        with partial.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["Path", "caption"])
            for i, (image, row) in enumerate(zip(images, labels, strict=True)):
                name = f"{i:06d}.png"
                Image.fromarray(image).save(directory / name)
                findings = findings_of(row)
                explicit = explicit_caption(findings)
                for text in (explicit, explicit, prism_caption(findings), typed_caption(findings, rng)):
                    writer.writerow([name, text])

    return write_aside(directory / CAPTIONS, write)


def write_base(directory: Path, vae_dir: Path) -> Path:
    """A diffusers SD directory to fine-tune from: the trained VAE, a freshly initialised UNet and
    text encoder (seeded), the CLIP tokenizer and the DDIM scheduler; written aside, then renamed."""

    def write(partial: Path) -> None:
        torch.manual_seed(3)
        architecture.unet().save_pretrained(partial / "unet")
        architecture.text_encoder().save_pretrained(partial / "text_encoder")
        save_tokenizer(partial / "tokenizer")
        make_scheduler().save_pretrained(partial / "scheduler")
        shutil.copytree(vae_dir, partial / "vae")

    return directory if directory.is_dir() else write_aside(directory, write)


def findings_of(row: np.ndarray) -> Findings:
    return Findings(*(bool(v) for v in row))


def batch_indices(images: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.integers(0, len(images), size)


def save_tokenizer(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(ASSETS / name, directory / name)
