"""The seeds' other methods on the built-in model: SDEdit (seed 004) and classifier guidance (seed 003)."""

import numpy as np
import pytest
import torch

from models.imaging.files import DecodedImage
from models.pipeline import generate_counterfactual
from models.request.errors import InvalidInput
from models.request.params import EditParams
from models.request.resolve import ResolvedEdit
from models.scoring.classifier import FindingClassifier
from models.weights.builtin import BUILTIN_DIR
from phantoms.bench import bench_case
from phantoms.captions import explicit_caption
from phantoms.render import anatomy_mask, render


@pytest.fixture(scope="module")
def classifier():
    return FindingClassifier.load(BUILTIN_DIR / "classifier.safetensors")


@pytest.fixture(scope="module")
def case():
    anatomy, source, target, _ = bench_case("remove_devices", 1, 128)
    pixels = np.round(render(anatomy, source) * 255) / 255
    return anatomy, DecodedImage(pixels.astype(np.float32), 8), explicit_caption(source), explicit_caption(target)


def test_sdedit_at_strength_zero_returns_the_reconstruction(builtin, case):
    _, image, source, target = case
    params = EditParams(method="sdedit", strength=0.0, steps=10)
    decoded = generate_counterfactual(
        builtin,
        image,
        ResolvedEdit(original_prompt=source, edit_prompt=target, params=params.replace(output="decoded")),
    )
    np.testing.assert_array_equal(decoded.counterfactual, decoded.reconstruction)
    residual = generate_counterfactual(
        builtin, image, ResolvedEdit(original_prompt=source, edit_prompt=target, params=params)
    )
    np.testing.assert_array_equal(residual.counterfactual, image.pixels)
    assert residual.report.method == "sdedit" and residual.report.inversion is None
    assert residual.report.candidates[0].self_replace_steps is None and residual.report.edited_fraction == 0


def test_sdedit_noise_follows_the_seed_not_the_global_rng(builtin, case):
    _, image, source, target = case
    params = EditParams(method="sdedit", strength=0.6, steps=10, output="decoded")
    state = torch.random.get_rng_state()
    runs = [
        generate_counterfactual(
            builtin, image, ResolvedEdit(original_prompt=source, edit_prompt=target, params=params.replace(seed=s))
        )
        for s in (1, 1, 2)
    ]
    assert torch.equal(torch.random.get_rng_state(), state)
    np.testing.assert_array_equal(runs[0].counterfactual, runs[1].counterfactual)
    assert np.abs(runs[0].counterfactual - runs[2].counterfactual).max() > 0.05
    assert np.abs(runs[0].counterfactual - image.pixels).mean() > 0.01  # it edits


def test_guided_removal_lowers_the_classifier_and_keeps_the_masked_anatomy(builtin, classifier, case):
    anatomy, image, source, target = case
    keep = anatomy_mask(anatomy)
    params = EditParams(method="guided", steps=10, classifier_targets={"Support Devices": 0})
    result = generate_counterfactual(
        builtin,
        image,
        ResolvedEdit(original_prompt=source, edit_prompt=target, params=params),
        keep=keep,
        classifier=classifier,
    )
    assert result.report.anatomy_mask and result.report.method == "guided"
    # residual output adds the edit only where the latent changed, and no latent cell touching a
    # kept pixel may change: the kept anatomy is the input's, exactly
    np.testing.assert_array_equal(result.counterfactual[keep], image.pixels[keep])
    assert 0.05 < result.report.edited_fraction < 1
    with torch.no_grad():
        before, after = (
            classifier.probabilities(torch.from_numpy(x)[None, None])["Support Devices"].item()
            for x in (image.pixels, result.counterfactual)
        )
    assert after < before - 0.2, (before, after)


def test_guided_without_a_mask_blends_nothing_and_says_so(builtin, classifier, case):
    _, image, source, target = case
    params = EditParams(method="guided", steps=4, classifier_targets={"Support Devices": 0})
    result = generate_counterfactual(
        builtin, image, ResolvedEdit(original_prompt=source, edit_prompt=target, params=params), classifier=classifier
    )
    assert not result.report.anatomy_mask and result.report.edited_fraction == 1.0


def test_guided_needs_a_classifier_and_targets_it_knows(builtin, classifier, case):
    _, image, source, target = case
    params = EditParams(method="guided", steps=2, classifier_targets={"Support Devices": 0})
    with pytest.raises(InvalidInput) as info:
        generate_counterfactual(builtin, image, ResolvedEdit(original_prompt=source, edit_prompt=target, params=params))
    assert info.value.field == "method"
    unknown = ResolvedEdit(
        original_prompt=source, edit_prompt=target, params=params.replace(classifier_targets={"Edema": 1})
    )
    with pytest.raises(InvalidInput) as info:
        generate_counterfactual(builtin, image, unknown, classifier=classifier)
    assert info.value.field == "classifier_targets"
