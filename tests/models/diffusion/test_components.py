import shutil

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from models.diffusion.attention_control import BlendMaps
from models.diffusion.components import load_bundle
from models.request.errors import ModelLoadError


def test_tiny_model_has_sd15_structure(bundle):
    assert bundle.unet.config.in_channels == 4 and bundle.unet.config.cross_attention_dim == 32
    assert bundle.tokenizer.model_max_length == 77
    assert bundle.scheduler.config.beta_schedule == "scaled_linear"
    assert bundle.latent_scale == pytest.approx(0.18215)
    assert bundle.resolution == 64 and bundle.dtype == torch.float32


@pytest.mark.parametrize(
    "missing",
    [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "text_encoder/model.safetensors",
        "clip/config.json",
    ],
)
def test_missing_file_is_named(tiny_model_dir, tmp_path, missing):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "m")
    (copy / missing).unlink()
    with pytest.raises(ModelLoadError, match=missing.split("/")[-1]) as err:
        load_bundle(copy)
    assert str(copy) in str(err.value)


def test_unet_state_dict_loads_over_base_and_changes_identity(tiny_model_dir, bundle, tmp_path):
    state = {k: v + 0.01 for k, v in bundle.unet.state_dict().items()}
    weights = tmp_path / "prism_unet.safetensors"
    save_file(state, str(weights))
    loaded = load_bundle(tiny_model_dir, unet_weights=weights)
    key = "conv_in.weight"
    assert torch.allclose(loaded.unet.state_dict()[key], state[key])
    assert loaded.identity != bundle.identity and loaded.inversion_identity != bundle.inversion_identity


def test_inversions_are_keyed_by_the_vae_encoder_not_its_decoder_or_the_blend_settings(tiny_model_dir, tmp_path):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "m")
    before = load_bundle(copy)
    vae = AutoencoderKL.from_pretrained(copy / "vae")
    with torch.no_grad():
        vae.decoder.conv_out.weight.add_(0.01)
    vae.save_pretrained(copy / "vae")
    (copy / "local_blend.json").write_text('{"side": 16, "dilation": 0}')
    decoded = load_bundle(copy)
    assert decoded.identity != before.identity and decoded.inversion_identity == before.inversion_identity
    with torch.no_grad():
        vae.encoder.conv_in.weight.add_(0.01)
    vae.save_pretrained(copy / "vae")
    encoded = load_bundle(copy)
    assert encoded.inversion_identity not in (before.inversion_identity, before.identity)
    vae.register_to_config(scaling_factor=0.2)
    vae.save_pretrained(copy / "vae")
    assert load_bundle(copy).inversion_identity != encoded.inversion_identity


def test_mismatched_unet_weights_are_rejected(tiny_model_dir, tmp_path):
    weights = tmp_path / "bad.safetensors"
    save_file({"conv_in.weight": torch.zeros(1)}, str(weights))
    with pytest.raises(ModelLoadError, match="do not match"):
        load_bundle(tiny_model_dir, unet_weights=weights)
    with pytest.raises(ModelLoadError, match="UNet weights file"):
        load_bundle(tiny_model_dir, unet_weights=tmp_path / "nope.safetensors")
    pickle_file = tmp_path / "w.bin"
    pickle_file.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="no pickle"):
        load_bundle(tiny_model_dir, unet_weights=pickle_file)


def test_cuda_request_without_cuda_is_a_clear_error(tiny_model_dir):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load_bundle(tiny_model_dir, device="cuda")


def test_model_can_ask_for_its_blend_maps(tiny_model_dir, tmp_path):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "m")
    default = load_bundle(copy)
    assert default.blend_maps == BlendMaps(None, 1)
    (copy / "local_blend.json").write_text('{"side": 16, "dilation": 0}')
    asked = load_bundle(copy)
    assert asked.blend_maps == BlendMaps(16, 0) and asked.identity != default.identity
    (copy / "local_blend.json").write_text('{"threshold": 0.45, "word_thresholds": {"effusion": 0.6}}')
    cut = load_bundle(copy)
    assert cut.blend_maps == BlendMaps(None, 1, 0.45, {"effusion": 0.6}) and cut.identity != asked.identity


@pytest.mark.parametrize(
    "text, message",
    [
        ("{", "could not read"),
        ("[16, 0]", "only 'side', 'dilation', 'threshold', 'word_thresholds'"),
        ('{"side": 16, "radius": 1}', "only 'side', 'dilation'"),
        ('{"side": 0}', "'side' must be"),
        ('{"dilation": true}', "'dilation' must be"),
        ('{"threshold": 1}', "'threshold' must be"),
        ('{"threshold": "0.4"}', "'threshold' must be"),
        ('{"word_thresholds": {"effusion": 0}}', "'word_thresholds' must map"),
        ('{"word_thresholds": ["effusion"]}', "'word_thresholds' must map"),
        ('{"word_thresholds": {"Pleural Effusion": 0.5}}', "key 'Pleural Effusion' is not one lower-case"),
    ],
)
def test_bad_blend_maps_file_is_a_clear_error(tiny_model_dir, tmp_path, text, message):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "m")
    (copy / "local_blend.json").write_text(text)
    with pytest.raises(ModelLoadError, match=message) as err:
        load_bundle(copy)
    assert "local_blend.json" in str(err.value)


def test_float16_applies_to_the_unet_only(tiny_model_dir):
    """The VAE (whose decoder overflows in fp16), the text encoder and CLIP stay fp32."""
    half = load_bundle(tiny_model_dir, device="cpu", dtype="float16")
    assert half.unet.dtype == torch.float16 and half.dtype == torch.float16
    assert {half.vae.dtype, half.text_encoder.dtype, half.clip.model.dtype} == {torch.float32}
