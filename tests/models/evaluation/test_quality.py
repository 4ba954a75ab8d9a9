"""Each metric of models/evaluation/quality.py on a case with a known answer."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from models.diffusion.components import load_bundle
from models.evaluation.quality import EvalCase, evaluate, frechet_distance, load_cases, markdown, ms_ssim, ssim
from models.imaging.files import encode_png
from models.request.errors import InvalidInput
from models.scoring.clip import ClipScorer
from models.weights.builtin import BUILTIN_DIR
from phantoms.bench import bench_case
from phantoms.captions import explicit_caption
from phantoms.render import render


@pytest.fixture(scope="module")
def scorer():
    bundle = load_bundle(BUILTIN_DIR, device="cpu")
    return ClipScorer(bundle.clip, bundle.device)


@pytest.fixture(scope="module")
def phantom():
    anatomy, source, target, _ = bench_case("remove_devices", 0, 128)
    return render(anatomy, source), render(anatomy, target), explicit_caption(source), explicit_caption(target)


class BrightnessClassifier:
    """P(Support Devices) = the image's mean intensity: a classifier whose every answer is known."""

    def probabilities(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"Support Devices": images.mean(dim=(1, 2, 3))}


class HalfMeans(nn.Module):
    """Two features, the mean of each image half: a shift of every pixel by c moves both by c."""

    num_features = 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        w = images.shape[-1] // 2
        return torch.stack([images[..., :w].mean((1, 2, 3)), images[..., w:].mean((1, 2, 3))], dim=1).double()


def test_identical_images_score_perfectly(phantom):
    original, *_ = phantom
    case = EvalCase("a", original, original.copy(), truth=original.copy())
    s = evaluate([case]).summary
    assert s.l1_input == 0 and s.l1_truth == 0 and s.l1_ratio == 0
    assert s.ssim_input == pytest.approx(1, abs=1e-6) and s.ms_ssim_input == pytest.approx(1, abs=1e-6)
    assert s.flip_rate is None and s.clip_accuracy is None and s.frechet_clip is None and s.fid is None


def test_a_known_shift_gives_its_l1_and_lowers_ssim(phantom):
    original, truth, *_ = phantom
    shifted = np.clip(original * 0.8 + 0.1, 0, 1)
    expected = float(np.abs(shifted - original).mean())
    s = evaluate([EvalCase("a", original, shifted, truth=truth)]).summary
    assert s.l1_input == pytest.approx(expected, rel=1e-6)
    assert s.l1_ratio == pytest.approx(np.abs(shifted - truth).mean() / np.abs(original - truth).mean(), rel=1e-5)
    assert 0.5 < s.ssim_input < 0.999 and 0.5 < s.ms_ssim_input < 0.999
    assert ssim(original, truth) < 1 and ms_ssim(original, truth) < 1


def test_ms_ssim_refuses_images_too_small_for_five_scales():
    with pytest.raises(InvalidInput, match="48 pixels"):
        ms_ssim(np.zeros((40, 40), np.float32), np.zeros((40, 40), np.float32))


def test_a_known_flip_and_probability_change():
    bright, dark = np.full((64, 64), 0.8, np.float32), np.full((64, 64), 0.2, np.float32)
    removed = EvalCase("removed", bright, dark, targets={"Support Devices": 0})
    kept = EvalCase("kept", bright, np.full((64, 64), 0.7, np.float32), targets={"Support Devices": 0})
    s = evaluate([removed, kept], classifier=BrightnessClassifier()).summary
    assert s.flip_rate == 0.5
    assert s.probability_change == pytest.approx((0.6 + 0.1) / 2, abs=1e-6)


def test_unknown_classifier_label_names_targets():
    image = np.zeros((64, 64), np.float32)
    with pytest.raises(InvalidInput, match="targets"):
        evaluate([EvalCase("a", image, image, targets={"Edema": 1})], classifier=BrightnessClassifier())


def test_clip_metrics_of_an_unchanged_image(scorer, phantom):
    original, _, source, target = phantom
    case = EvalCase("a", original, original.copy(), None, source, target, {"Support Devices": 0})
    s = evaluate([case], scorer=scorer).summary
    t_target, t_opposite = scorer.text_embeddings([target, source])
    assert s.esas == pytest.approx(float(((t_target - t_opposite) ** 2).mean()), rel=1e-4)
    assert s.s_clip == pytest.approx(0, abs=1e-6)  # no image change: no direction


def test_clip_accuracy_is_complementary_under_swapped_prompts(scorer, phantom):
    original, truth, source, target = phantom
    forward = EvalCase("a", original, truth, None, source, target, {"Support Devices": 0})
    swapped = EvalCase("a", original, truth, None, target, source, {"Support Devices": 1})
    a = evaluate([forward], scorer=scorer).summary.clip_accuracy
    b = evaluate([swapped], scorer=scorer).summary.clip_accuracy
    assert {a, b} == {0.0, 1.0}


def test_clip_accuracy_uses_the_papers_prompts_without_captions(scorer, phantom):
    original, truth, *_ = phantom
    case = EvalCase("a", original, truth, targets={"Support Devices": 0})
    f_gen = scorer.image_embeddings(torch.from_numpy(truth)[None, None])[0]
    no, yes = scorer.text_embeddings(["No Support Devices", "Support Devices"])
    expected = float(f_gen @ no > f_gen @ yes)
    assert evaluate([case], scorer=scorer).summary.clip_accuracy == expected


def test_frechet_distance_of_a_known_shift():
    rng = np.random.default_rng(0)
    reference = [rng.random((16, 16), dtype=np.float32) for _ in range(40)]
    assert frechet_distance(HalfMeans(), reference, reference) == pytest.approx(0, abs=1e-6)
    shifted = [x + 0.25 for x in reference]
    assert frechet_distance(HalfMeans(), shifted, reference) == pytest.approx(2 * 0.25**2, rel=1e-3)


def test_fid_proper_with_a_local_torchscript_inception(tmp_path, scorer, phantom):
    class Stub(nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
            return x.float().mean(dim=(2, 3)) / 255

    path = tmp_path / "inception.pt"
    torch.jit.script(Stub()).save(str(path))
    original, truth, *_ = phantom
    cases = [EvalCase(str(i), original, np.clip(truth + 0.01 * i, 0, 1), truth) for i in range(4)]
    s = evaluate(cases, scorer=scorer, inception=path).summary
    assert s.fid is not None and s.fid > 0 and s.frechet_reference == "truth"
    assert s.frechet_clip is not None and s.frechet_clip >= 0
    assert "not an FID" in markdown(evaluate(cases, scorer=scorer))


def test_load_cases_reads_the_folder_layout(tmp_path, phantom):
    original, truth, source, target = phantom
    for kind, image in (("input", original), ("truth", truth), ("counterfactual", truth)):
        (tmp_path / kind).mkdir()
        (tmp_path / kind / "c1.png").write_bytes(encode_png(image, 16))
    np.save(tmp_path / "counterfactual" / "c2.npy", original)
    np.save(tmp_path / "input" / "c2.npy", original)
    manifest = {"c1": {"original_prompt": source, "edit_prompt": target, "targets": {"Support Devices": "0"}}}
    (tmp_path / "cases.json").write_text(json.dumps(manifest))
    c1, c2 = load_cases(tmp_path)
    assert (c1.name, c2.name) == ("c1", "c2") and c1.targets == {"Support Devices": 0}
    np.testing.assert_allclose(c1.truth, truth, atol=1 / 65535)
    assert c2.truth is None and c2.original_prompt is None


def test_load_cases_names_what_is_wrong(tmp_path):
    with pytest.raises(InvalidInput, match="^input"):
        load_cases(tmp_path)
    for kind in ("input", "counterfactual"):
        (tmp_path / kind).mkdir()
    np.save(tmp_path / "input" / "a.npy", np.zeros((8, 8), np.float32))
    np.save(tmp_path / "counterfactual" / "a.npy", np.zeros((8, 9), np.float32))
    with pytest.raises(InvalidInput, match="^counterfactual: case 'a'"):
        load_cases(tmp_path)


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("counterfactual/a.png", b"not an image", "not a PNG, JPEG or DICOM"),
        ("counterfactual/a.npy", b"not an array", "not a NumPy array file"),
        ("counterfactual/a.npy", np.zeros((2, 8, 8)), "a float64 array of shape (2, 8, 8); expected H x W"),
        ("cases.json", b'{"a": ', "Invalid JSON"),
        ("cases.json", b"[1]", "Input should be an object"),
        ("cases.json", b'{"a": {"target": {"Support Devices": 0}}}', "a.target: Extra inputs are not permitted"),
        ("cases.json", b'{"a": {"targets": {"Support Devices": 2}}}', "a.targets.Support Devices: Input should be"),
    ],
    ids=["undecodable-image", "garbage-npy", "3d-npy", "truncated-json", "json-list", "misspelt-key", "target-2"],
)
def test_an_unusable_file_is_refused_naming_its_kind_and_path(tmp_path, file, content, message):
    for kind in ("input", "counterfactual"):
        (tmp_path / kind).mkdir()
    (tmp_path / "input" / "a.png").write_bytes(encode_png(np.zeros((8, 8), np.float32), 8))
    if not file.startswith("counterfactual"):
        (tmp_path / "counterfactual" / "a.png").write_bytes(encode_png(np.zeros((8, 8), np.float32), 8))
    if isinstance(content, bytes):
        (tmp_path / file).write_bytes(content)
    else:
        np.save(tmp_path / file, content)
    with pytest.raises(InvalidInput) as raised:
        load_cases(tmp_path)
    field = "cases.json" if file == "cases.json" else "counterfactual"
    assert str(raised.value).startswith(f"{field}: {tmp_path / file}: {message}")
