"""Fine-tuning as in PRISM's Algorithm 1: Stable Diffusion's UNet trained on chest X-rays with
captions made from their labels by the paper's template (Code Listing 1, :func:`models.request.findings.caption`).

Per step: encode a batch with the frozen VAE, noise it at uniform timesteps, and regress the
noise from the caption's text embedding (an empty caption 10 % of the time, for classifier-free
guidance): L = ||ε − ε_θ(√ᾱ_t z0 + √(1 − ᾱ_t) ε, t, τ(caption))||². The VAE and the text encoder
stay frozen unless ``train_text_encoder`` is set.

Every piece of state a step depends on (weights, optimiser, learning-rate schedule, EMA, loss
scaler, the noise generator, the data order) is in the checkpoint, so a resumed run continues
bit-exactly; an interrupted run checkpoints before it stops. The built-in phantom model's
diffusion stage is trained by this class too (:mod:`phantoms.training`).
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import models.weights.offline  # noqa: F401  (before diffusers/transformers)
from models.atomic import write_aside
from models.diffusion.components import ModelBundle, embed_prompts, encode_latent, load_parts, model_resolution
from models.diffusion.ddim import make_scheduler
from models.imaging.files import DecodedImage, read_image_file
from models.imaging.geometry import to_model_input
from models.pipeline import generate_counterfactual
from models.request.errors import InvalidInput, ModelLoadError
from models.request.findings import CONDITIONS, caption, normalize_labels
from models.request.manifest import find_file
from models.request.params import FinetuneConfig
from models.request.resolve import ResolvedEdit
from models.training.stopping import StopSwitch

log = logging.getLogger("prism.finetune")
CHECKPOINT = "checkpoint"
CAPTION_COLUMN = "caption"
LATENTS = "latents.pt"
ENCODE_BATCH = 64


class Example(BaseModel):
    """One image and its caption wordings: a run draws one per use (several rows naming the
    same image in a captions table give several wordings)."""

    path: Path
    captions: list[str] = Field(min_length=1)


def _columns(header: list[str]) -> dict[str, str]:
    """The table's own spelling of each column this reader uses, matched as ``normalize_labels``
    matches conditions: case and surrounding spaces ignored."""
    wanted = {name.lower(): name for name in ("Path", CAPTION_COLUMN, *CONDITIONS)}
    return {wanted[h.strip().lower()]: h for h in header if h and h.strip().lower() in wanted}


def read_examples(images: Path, table: Path) -> list[Example]:
    """Images and captions from a CSV with a ``Path`` column and either the 14 CheXpert conditions
    (1, 0, -1 or blank; captioned by the template) or a ``caption`` column. A path is looked up
    under ``images`` as written, then without its leading folders, one at a time. Rows naming the
    same image add wordings to one example. The table may start with a byte-order mark (a
    spreadsheet's "CSV UTF-8"); column names are matched regardless of case."""
    try:
        with table.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = _columns(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InvalidInput("labels", f"cannot read {table}: {exc}") from exc
    if not rows or "Path" not in columns:
        raise InvalidInput("labels", f"{table} needs a 'Path' column and at least one row")
    has_caption = CAPTION_COLUMN in columns
    missing = [c for c in CONDITIONS if c not in columns]
    if not has_caption and missing:
        raise InvalidInput("labels", f"{table} has neither a 'caption' column nor the conditions {missing}")
    examples: dict[Path, Example] = {}
    for n, row in enumerate(rows, start=2):
        path = find_file(images, (row[columns["Path"]] or "").strip())
        if path is None:
            raise InvalidInput("images", f"{table} line {n}: no image {row[columns['Path']]} under {images}")
        if has_caption:
            text = (row[columns[CAPTION_COLUMN]] or "").strip()
            if not text:
                raise InvalidInput("labels", f"{table} line {n}: the caption is empty")
        else:
            try:
                text = caption(normalize_labels({c: row[columns[c]] for c in CONDITIONS}, "labels"))
            except InvalidInput as exc:
                raise InvalidInput("labels", f"{table} line {n}: {exc.message}") from exc
        if path in examples:
            examples[path].captions.append(text)
        else:
            examples[path] = Example(path=path, captions=[text])
    return list(examples.values())


def _math(config: dict) -> dict:
    """The settings a resumed run must share with the checkpoint's (how often it saves or validates may change)."""
    return {k: v for k, v in config.items() if k not in ("checkpoint_every", "validate_every")}


class Finetuner:
    """The models, optimiser and state of one run; :meth:`run` trains to ``config.steps``."""

    def __init__(
        self,
        base: Path,
        examples: list[Example],
        work: Path,
        config: FinetuneConfig,
        device: str,
        stop: StopSwitch | None = None,
    ) -> None:
        if not (base / "unet").is_dir():
            raise ModelLoadError(f"no diffusers model at {base} (needs unet/, vae/, text_encoder/, tokenizer/)")
        self.base, self.examples, self.work, self.config = base, examples, work, config
        self.device = torch.device(device)
        parts = load_parts(base)
        self.unet, self.vae, self.text_encoder, self.tokenizer = (
            parts.unet,
            parts.vae,
            parts.text_encoder,
            parts.tokenizer,
        )
        self.alphas = make_scheduler().alphas_cumprod.to(self.device)
        self.resolution = model_resolution(self.unet, self.vae)
        self.vae.requires_grad_(False).eval().to(self.device)
        self.text_encoder.requires_grad_(config.train_text_encoder).train(config.train_text_encoder)
        self.text_encoder.to(self.device)
        self.unet.train().to(self.device)
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.params = list(self.unet.parameters())
        if config.train_text_encoder:
            self.params += list(self.text_encoder.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=1e-2)
        self.lr_schedule = get_scheduler(
            config.lr_schedule,
            self.optimizer,
            num_warmup_steps=config.warmup_steps,
            num_training_steps=config.steps,
        )
        self.ema = EMAModel(self.unet.parameters(), decay=config.ema_decay) if config.ema_decay else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.mixed_precision == "fp16")
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.losses: list[float] = []
        self._epoch_order: tuple[int, np.ndarray] | None = None
        self.stop = stop or StopSwitch()
        self.cached_latents = self._encode_all() if config.cache_latents else None
        if (work / CHECKPOINT).is_dir():
            self._load(work / CHECKPOINT)

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = np.random.default_rng([self.config.seed, epoch]).permutation(len(self.examples))
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def _batch_indices(self, micro: int) -> list[int]:
        """The examples of micro-batch ``micro`` (counted from the start of the run): a fixed
        permutation per epoch, so any step's data is known without replaying the ones before."""
        size, n = self.config.batch_size, len(self.examples)
        first = micro * size
        return [int(self._order((first + k) // n)[(first + k) % n]) for k in range(size)]

    def _encode(self, indices: list[int]) -> torch.Tensor:
        return encode_latent(self.vae, torch.cat([self._image(i) for i in indices]))

    def _encode_all(self) -> torch.Tensor:
        """Every example's latent, in fixed chunks (so the same on every sitting), kept in
        ``work/latents.pt`` for a resumed run."""
        path, images = self.work / LATENTS, [str(e.path) for e in self.examples]
        if path.exists():
            saved = torch.load(path, weights_only=True)
            if saved["images"] == images:
                return saved["latents"].to(self.device)
        chunks = range(0, len(self.examples), ENCODE_BATCH)
        encoded = [
            self._encode(list(range(i, min(i + ENCODE_BATCH, len(self.examples)))))
            for i in tqdm(chunks, desc="encoding", unit="chunk")
        ]
        latents = torch.cat(encoded)
        self.work.mkdir(parents=True, exist_ok=True)
        torch.save({"images": images, "latents": latents.cpu()}, path)
        return latents

    def _latents(self, indices: list[int]) -> torch.Tensor:
        if self.cached_latents is not None:
            return self.cached_latents[indices]
        return self._encode(indices)

    def _caption(self, i: int) -> str:
        wordings = self.examples[i].captions
        if len(wordings) == 1:
            return wordings[0]
        return wordings[int(torch.randint(len(wordings), (1,), generator=self.generator))]

    def _image(self, i: int) -> torch.Tensor:
        pixels = read_image_file(self.examples[i].path, "images").pixels
        return to_model_input(pixels, self.resolution)[0]

    def _loss(self, indices: list[int]) -> torch.Tensor:
        z0 = self._latents(indices)
        drop = torch.rand(len(indices), generator=self.generator) < self.config.caption_dropout
        captions = ["" if d else self._caption(i) for i, d in zip(indices, drop.tolist(), strict=True)]
        t = torch.randint(0, len(self.alphas), (len(indices),), generator=self.generator).to(self.device)
        noise = torch.randn(z0.shape, generator=self.generator).to(self.device)
        a = self.alphas[t].view(-1, 1, 1, 1)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.config.mixed_precision)
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            context = embed_prompts(self.text_encoder, self.tokenizer, captions)
            pred = self.unet(a.sqrt() * z0 + (1 - a).sqrt() * noise, t, encoder_hidden_states=context).sample
        return F.mse_loss(pred.float(), noise)

    def train_step(self) -> float:
        """One optimiser step, all or nothing: stopped while it computes gradients (Ctrl-C, a bad
        image), it leaves the state as the last step left it, noise generator included, so the
        checkpoint written on the way out resumes bit-exactly."""
        accumulation = self.config.gradient_accumulation
        rng = self.generator.get_state()
        total = 0.0
        try:
            with self.stop.interruptible():
                for k in range(accumulation):
                    loss = self._loss(self._batch_indices(self.step * accumulation + k)) / accumulation
                    self.scaler.scale(loss).backward()
                    total += float(loss.detach())
        except BaseException:
            self.generator.set_state(rng)
            self.optimizer.zero_grad(set_to_none=True)
            raise
        if self.config.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_schedule.step()
        if self.ema is not None:
            self.ema.step(self.unet.parameters())
        self.step += 1
        self.losses.append(total)
        return total

    def run(self, validate: Callable[[Finetuner], dict] | None = None) -> list[float]:
        """Train to ``config.steps`` from wherever the checkpoint left off; checkpoint every
        ``checkpoint_every`` steps, at the end, and when stopped (KeyboardInterrupt, or a request
        to :attr:`stop` from a signal handler). Returns the losses of the whole run."""
        self.work.mkdir(parents=True, exist_ok=True)
        log_file = (self.work / "finetune.log").open("a", buffering=1)
        bar = tqdm(total=self.config.steps, initial=self.step, desc="finetune")
        try:
            while self.step < self.config.steps:
                loss = self.train_step()
                lr = self.lr_schedule.get_last_lr()[0]
                bar.update()
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                record = {"step": self.step, "loss": loss, "lr": lr}
                if validate and self.config.validate_every and self.step % self.config.validate_every == 0:
                    record["validation"] = validate(self)
                log_file.write(json.dumps(record) + "\n")
                if self.step % self.config.checkpoint_every == 0:
                    self.save_checkpoint()
                self.stop.check()
        finally:
            self.save_checkpoint()
            bar.close()
            log_file.close()
        return self.losses

    def save_checkpoint(self) -> None:
        """Write the whole state to a fresh directory, then swap it in (a crash never leaves half)."""
        write_aside(self.work / CHECKPOINT, self._write_checkpoint)

    def _write_checkpoint(self, tmp: Path) -> None:
        tmp.mkdir(parents=True)
        save_file(self.unet.state_dict(), str(tmp / "unet.safetensors"))
        if self.config.train_text_encoder:
            save_file(self.text_encoder.state_dict(), str(tmp / "text_encoder.safetensors"))
        state = {
            "step": self.step,
            "losses": self.losses,
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "config": self.config.model_dump(),
        }
        torch.save(state, tmp / "state.pt")

    def _load(self, checkpoint: Path) -> None:
        state = torch.load(checkpoint / "state.pt", weights_only=False)
        if _math(state["config"]) != _math(self.config.model_dump()):
            raise InvalidInput("work", f"{self.work} holds a run with other settings; use a new --work directory")
        self.unet.load_state_dict(load_file(str(checkpoint / "unet.safetensors")))
        if self.config.train_text_encoder:
            self.text_encoder.load_state_dict(load_file(str(checkpoint / "text_encoder.safetensors")))
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.step, self.losses = state["step"], state["losses"]
        log.info("resumed at step %d", self.step)

    def trained_unet(self) -> UNet2DConditionModel:
        """The UNet to ship: the EMA weights when EMA is on."""
        unet = copy.deepcopy(self.unet).eval()
        if self.ema is not None:
            self.ema.copy_to(unet.parameters())
        return unet

    def export(self, out: Path, full_model: bool) -> Path:
        """``out/unet.safetensors`` (for ``--unet-weights``); with ``full_model`` (always when the
        text encoder was trained) also ``out/model``, the base directory with the trained parts."""
        out.mkdir(parents=True, exist_ok=True)
        unet = self.trained_unet()
        save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(out / "unet.safetensors"))
        if full_model or self.config.train_text_encoder:
            model = out / "model"
            shutil.rmtree(model, ignore_errors=True)
            shutil.copytree(self.base, model)
            save_unet(unet, model / "unet")
            if self.config.train_text_encoder:
                self.text_encoder.save_pretrained(model / "text_encoder")
        return out


def save_unet(unet: UNet2DConditionModel, directory: Path) -> None:
    """``save_pretrained`` without the ``_name_or_path`` diffusers records on loading: a model's
    files, and so its hash, must not depend on the folder it was trained in."""
    unet.save_pretrained(directory)
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config.pop("_name_or_path", None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def validation_edit(
    bundle: ModelBundle, image: DecodedImage, edit: ResolvedEdit, out: Path
) -> Callable[[Finetuner], dict]:
    """A ``validate`` callback for :meth:`Finetuner.run`: the current weights (EMA if on) copied into
    ``bundle``, one counterfactual written to ``out/step_{N}.png``; returns its S_CLIP."""

    def validate(run: Finetuner) -> dict:
        bundle.unet.load_state_dict(run.trained_unet().state_dict())
        if run.config.train_text_encoder:
            bundle.text_encoder.load_state_dict(run.text_encoder.state_dict())
        result = generate_counterfactual(bundle, image, edit)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"step_{run.step:07d}.png").write_bytes(result.files()["counterfactual.png"])
        return {"s_clip": result.report.s_clip}

    return validate
