"""The model's components: loaded from local directories only, once, for reuse; and the one
image encoding, decoding and prompt embedding every user of them shares (the pipeline, its
methods, ``prism finetune`` and the phantom training).

Accepted layouts:
  * a diffusers Stable Diffusion directory (unet/, vae/, text_encoder/, tokenizer/, scheduler/);
  * the same base directory plus a UNet state-dict ``.safetensors`` file (how PRISM publishes
    its fine-tuned UNet), loaded over the base UNet;
  * a CLIP directory (transformers CLIPModel + tokenizer + preprocessor config) for scoring,
    by default ``<model_dir>/clip``;
  * optionally ``local_blend.json`` in the model directory, e.g. ``{"side": 16, "dilation": 0,
    "threshold": 0.4, "word_thresholds": {"effusion": 0.6}}``: the cross-attention maps LocalBlend
    should use for this model and where it cuts them (``BlendMaps``; P2P's for a key left out).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

import models.weights.offline  # noqa: F401  (before diffusers/transformers)
from models.diffusion.attention_control import P2P_BLEND_MAPS, BlendMaps
from models.diffusion.ddim import make_scheduler
from models.request.constants import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD, SD15_LATENT_SCALE, TOKEN_WINDOW
from models.request.errors import ModelLoadError
from models.request.params import DtypeName
from models.request.words import prompt_words
from models.weights.layout import locate_model, require

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
log = logging.getLogger("prism.models")


@dataclass
class ClipParts:
    model: CLIPModel
    tokenizer: CLIPTokenizer
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass
class ModelBundle:
    """Everything one worker holds in memory: loaded once, used for every job."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    clip: ClipParts
    device: torch.device
    dtype: torch.dtype
    identity: str
    """Fingerprint of everything loaded: the model a result came from."""
    inversion_identity: str
    """Fingerprint of what an inversion reads (UNet, text encoder, the VAE's encoder half), which keys
    cached inversions: a new decoder, CLIP scorer or ``local_blend.json`` keeps them valid."""
    resolution: int
    blend_maps: BlendMaps = P2P_BLEND_MAPS
    loop_unet: torch.nn.Module | None = None
    """``unet`` compiled for the inversion loops (``models.diffusion.compiled``); None: ``unet`` itself."""
    compile: str = "off"
    """How ``loop_unet`` was compiled: off, compile or cudagraph."""

    @property
    def latent_scale(self) -> float:
        return latent_scale(self.vae)

    @property
    def inversion_unet(self) -> torch.nn.Module:
        """The UNet DDIM inversion, null-text optimisation and direct's offsets call."""
        return self.unet if self.loop_unet is None else self.loop_unet


def _fingerprint(h: hashlib._Hash, path: Path) -> None:
    """Hash a file by name, size and its first and last MiB: cheap for multi-GB weights."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())


VAE_ENCODER_PREFIXES = ("encoder.", "quant_conv.")
"""The VAE tensors an encoding reads."""


def _encoder_fingerprint(h: hashlib._Hash, vae: AutoencoderKL) -> None:
    """Hash the VAE's encoder half: its config (the latent scale with it) and the tensors an
    encoding reads, from the loaded model, since one weights file holds the decoder too."""
    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in vae.state_dict().items():
        if name.startswith(VAE_ENCODER_PREFIXES):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _is_count(value: object, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _is_fraction(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 1


def _read_blend_maps(path: Path) -> BlendMaps:
    """The model's ``local_blend.json``, checked; P2P's choice for what it leaves out."""
    if not path.exists():
        return P2P_BLEND_MAPS
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"could not read {path}: {exc}") from exc
    keys = [f.name for f in fields(BlendMaps)]
    if not isinstance(raw, dict) or set(raw) - set(keys):
        raise ModelLoadError(f"{path} must be an object with only {', '.join(map(repr, keys))}")
    blend = BlendMaps(**raw)
    if blend.side is not None and not _is_count(blend.side, 1):
        raise ModelLoadError(f"{path}: 'side' must be a positive integer or null")
    if not _is_count(blend.dilation, 0):
        raise ModelLoadError(f"{path}: 'dilation' must be a non-negative integer")
    if not _is_fraction(blend.threshold):
        raise ModelLoadError(f"{path}: 'threshold' must be a number between 0 and 1 (exclusive)")
    words = blend.word_thresholds
    if not isinstance(words, dict) or not all(_is_fraction(t) for t in words.values()):
        raise ModelLoadError(f"{path}: 'word_thresholds' must map words to numbers between 0 and 1 (exclusive)")
    for word in words:
        if prompt_words(word) != [word]:
            raise ModelLoadError(f"{path}: 'word_thresholds' key {word!r} is not one lower-case prompt word")
    return blend


def write_clip_preprocessor(directory: Path, image_size: int) -> None:
    """The ``preprocessor_config.json`` a CLIP directory needs: input size and CLIP's normalisation."""
    config = {
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": image_size},
        "crop_size": {"height": image_size, "width": image_size},
        "image_mean": list(CLIP_IMAGE_MEAN),
        "image_std": list(CLIP_IMAGE_STD),
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | None, dtype: DtypeName | None) -> tuple[torch.device, torch.dtype]:
    """The device (CUDA when there is one) and the UNet's dtype (fp16 on CUDA, fp32 on CPU by default)."""
    device_t = torch.device(device or default_device())
    if device_t.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' requested but CUDA is not available")
    return device_t, DTYPES[dtype] if dtype else (torch.float16 if device_t.type == "cuda" else torch.float32)


@dataclass
class DiffusionParts:
    """The four parts of a Stable Diffusion directory that inversion, editing and training use."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer


def load_parts(model_dir: Path, unet_dtype: torch.dtype | None = None) -> DiffusionParts:
    """The UNet (in ``unet_dtype``), VAE, text encoder and tokenizer of a diffusers directory, from
    local files only; a directory that is not one is a ModelLoadError naming it."""
    try:
        return DiffusionParts(
            unet=UNet2DConditionModel.from_pretrained(
                model_dir / "unet", local_files_only=True, torch_dtype=unet_dtype
            ),
            vae=AutoencoderKL.from_pretrained(model_dir / "vae", local_files_only=True),
            text_encoder=CLIPTextModel.from_pretrained(model_dir / "text_encoder", local_files_only=True),
            tokenizer=CLIPTokenizer.from_pretrained(model_dir / "tokenizer", local_files_only=True),
        )
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"could not load model from {model_dir}: {exc}") from exc


def model_resolution(unet: UNet2DConditionModel, vae: AutoencoderKL) -> int:
    """The image side the model works at: the UNet's latent side times the VAE's downsampling."""
    return int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)


def latent_scale(vae: AutoencoderKL) -> float:
    return float(getattr(vae.config, "scaling_factor", SD15_LATENT_SCALE))


@torch.no_grad()
def encode_latent(vae: AutoencoderKL, image: torch.Tensor) -> torch.Tensor:
    """VAE posterior mean times the scaling factor, for (B, 1, S, S) images in [0, 1].

    Grayscale is repeated over the VAE's input channels (3 for SD v1.5, 1 for the built-in model).
    """
    x = (image * 2 - 1).expand(-1, vae.config.in_channels, -1, -1).to(vae.device, vae.dtype)
    return vae.encode(x).latent_dist.mean.float() * latent_scale(vae)


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """(B, 4, h, w) latents -> (B, 1, S, S) grayscale in [0, 1] (differentiable with ``grad``)."""
    with torch.set_grad_enabled(grad):
        images = vae.decode((latents / latent_scale(vae)).to(vae.dtype)).sample.float()
        return ((images.mean(1, keepdim=True) + 1) / 2).clamp(0, 1)


def embed_prompts(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """The text encoder's last hidden states of ``prompts`` padded to the 77-token window; with
    gradients only where the encoder is being trained."""
    tokens = tokenizer(prompts, padding="max_length", max_length=TOKEN_WINDOW, truncation=True, return_tensors="pt")
    return text_encoder(tokens.input_ids.to(text_encoder.device))[0]


def load_bundle(
    model_dir: str | Path | None,
    unet_weights: str | Path | None = None,
    clip_dir: str | Path | None = None,
    device: str | None = None,
    dtype: DtypeName | None = None,
) -> ModelBundle:
    """Load the diffusion model and CLIP scorer; ``model_dir`` None means the built-in phantom model.

    ``dtype`` applies to the UNet only: it carries nearly all of the compute, while the VAE, text
    encoder and CLIP run a few times per job and stay in fp32 (the VAE's decoder is the part of SD
    known to overflow in fp16). Null-text keeps its embeddings, loss and optimiser in fp32 whatever
    the UNet's dtype (see :func:`models.diffusion.inversion.input_gradient`).
    """
    if model_dir is None:
        log.warning("no model directory configured: using the built-in phantom model (synthetic data only)")
    layout = locate_model(model_dir, clip_dir)
    model_dir, clip_path = layout.model_dir, layout.clip_dir
    blend_file = model_dir / "local_blend.json"
    blend_maps = _read_blend_maps(blend_file)

    device_t, torch_dtype = resolve_device(device, dtype)

    parts = load_parts(model_dir, torch_dtype)
    unet, vae, text_encoder, tokenizer = parts.unet, parts.vae, parts.text_encoder, parts.tokenizer
    try:
        if unet_weights is not None:
            _load_unet_weights(unet, Path(unet_weights))
        clip_model = CLIPModel.from_pretrained(clip_path, local_files_only=True)
        clip_tokenizer = CLIPTokenizer.from_pretrained(clip_path, local_files_only=True)
        preprocess = json.loads((clip_path / "preprocessor_config.json").read_text())
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"could not load model from {model_dir}: {exc}") from exc

    scheduler_file = model_dir / "scheduler" / "scheduler_config.json"
    scheduler_config = json.loads(scheduler_file.read_text()) if scheduler_file.exists() else None
    scheduler = make_scheduler(scheduler_config)

    read = hashlib.sha256()
    for sub in ("unet", "text_encoder"):
        for f in sorted((model_dir / sub).glob("*")):
            _fingerprint(read, f)
    if unet_weights is not None:
        _fingerprint(read, Path(unet_weights))
    _encoder_fingerprint(read, vae)
    inversion_identity = read.hexdigest()[:16]
    h = hashlib.sha256(inversion_identity.encode())
    for f in sorted((model_dir / "vae").glob("*")):
        _fingerprint(h, f)
    if blend_file.exists():
        _fingerprint(h, blend_file)
    for f in sorted(clip_path.glob("*")):
        if f.is_file():
            _fingerprint(h, f)

    size = preprocess.get("crop_size") or preprocess.get("size") or {}
    image_size = int(size.get("height", size.get("shortest_edge", 224)) if isinstance(size, dict) else size)
    clip = ClipParts(
        model=clip_model,
        tokenizer=clip_tokenizer,
        image_size=image_size,
        mean=tuple(preprocess.get("image_mean", CLIP_IMAGE_MEAN)),
        std=tuple(preprocess.get("image_std", CLIP_IMAGE_STD)),
    )
    identity = h.hexdigest()[:16]
    return assemble_bundle(
        unet, vae, text_encoder, tokenizer, scheduler, clip, device_t, identity, blend_maps, inversion_identity
    )


def assemble_bundle(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    scheduler: DDIMScheduler,
    clip: ClipParts,
    device: torch.device,
    identity: str,
    blend_maps: BlendMaps = P2P_BLEND_MAPS,
    inversion_identity: str | None = None,
) -> ModelBundle:
    """Frozen, in eval mode and on ``device``: the bundle a worker holds (the UNet keeps its dtype).

    ``inversion_identity`` defaults to ``identity`` (any change invalidates cached inversions).
    """
    for module in (unet, vae, text_encoder, clip.model):
        module.requires_grad_(False)
        module.eval()
        module.to(device)
    return ModelBundle(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        clip=clip,
        device=device,
        dtype=unet.dtype,
        identity=identity,
        inversion_identity=inversion_identity or identity,
        resolution=model_resolution(unet, vae),
        blend_maps=blend_maps,
    )


def _load_unet_weights(unet: UNet2DConditionModel, path: Path) -> None:
    """Load a UNet state dict (diffusers key names) over the base UNet, strictly."""
    require(path, "UNet weights file")
    if path.suffix != ".safetensors":
        raise ModelLoadError(f"UNet weights must be a .safetensors file (no pickle): {path}")
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ModelLoadError(f"could not read UNet weights {path}: {exc}") from exc
    state = {k.removeprefix("unet."): v for k, v in state.items()}
    expected = unet.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelLoadError(
            f"UNet weights {path} do not match the base UNet: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    bad = [k for k, v in state.items() if v.shape != expected[k].shape]
    if bad:
        raise ModelLoadError(f"UNet weights {path} have wrong shapes for {len(bad)} tensors (e.g. {bad[:3]})")
    unet.load_state_dict(state)
