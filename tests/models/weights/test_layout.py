import shutil
import subprocess
import sys

import pytest

from models.request.errors import ModelLoadError
from models.weights.builtin import BUILTIN_DIR
from models.weights.layout import locate_model


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ("unet/config.json", "missing unet file"),
        ("vae/diffusion_pytorch_model.safetensors", "missing vae file"),
        ("text_encoder/model.safetensors", "missing text_encoder file"),
        ("clip/preprocessor_config.json", "missing CLIP file"),
        ("tokenizer/tokenizer.json", "missing tokenizer file (or tokenizer.json)"),
    ],
)
def test_the_first_missing_file_is_named_with_its_path(tiny_model_dir, tmp_path, missing, message):
    """Without ``tokenizer.json`` the slow tokenizer's pair is asked for, ``vocab.json`` first."""
    copy = shutil.copytree(tiny_model_dir, tmp_path / "m")
    (copy / missing).unlink()
    named = copy / "tokenizer" / "vocab.json" if missing.startswith("tokenizer/") else copy / missing
    with pytest.raises(ModelLoadError) as err:
        locate_model(copy)
    assert str(err.value) == f"{message}: {named}"


def test_a_complete_directory_gives_its_parts_and_none_means_the_built_in_model(tiny_model_dir, tmp_path):
    layout = locate_model(tiny_model_dir)
    assert (layout.model_dir, layout.clip_dir) == (tiny_model_dir, tiny_model_dir / "clip")
    clip = shutil.copytree(tiny_model_dir / "clip", tmp_path / "scorer")
    assert locate_model(tiny_model_dir, clip).clip_dir == clip
    assert locate_model(None).model_dir == BUILTIN_DIR
    with pytest.raises(ModelLoadError, match=f"^CLIP model directory not found: {tmp_path / 'gone'} "):
        locate_model(tiny_model_dir, tmp_path / "gone")
    with pytest.raises(ModelLoadError, match=f"^model directory not found: {tmp_path / 'nowhere'}$"):
        locate_model(tmp_path / "nowhere")


def test_checking_a_directory_imports_no_framework(tmp_path):
    """What lets ``prism worker`` and ``prism edit`` refuse a wrong directory within a second."""
    code = (
        "import sys; from models.weights.layout import locate_model\n"
        f"try: locate_model({str(tmp_path)!r})\n"
        "except Exception as exc: print(type(exc).__name__)\n"
        "print(sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["ModelLoadError", "[]"], proc.stderr
