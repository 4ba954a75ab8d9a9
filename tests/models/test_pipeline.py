"""How the counterfactual is formed from the decoded edit: residual (default) and decoded."""

from dataclasses import replace

import numpy as np
import torch

from models.diffusion.attention_control import BlendMaps
from models.diffusion.inversion import InversionCache
from models.imaging.files import DecodedImage
from models.pipeline import edited_regions, generate_counterfactual
from models.request.params import EditParams, NullTextSettings
from models.request.report import FILE_NAMES
from models.request.resolve import ResolvedEdit
from tests.helpers import xray_like

SOURCE = "chest x-ray of a patient with support devices"
EDIT = "chest x-ray of a patient without support devices"


def test_residual_output_is_the_input_plus_the_edit_effect(bundle, tmp_path):
    image = DecodedImage(xray_like(80, 60, seed=4), 8)
    cache = InversionCache(tmp_path)
    base = EditParams(steps=6, self_replace_steps=(0.5,), null_text=NullTextSettings(inner_steps=2))
    decoded = generate_counterfactual(
        bundle, image, ResolvedEdit(original_prompt=SOURCE, edit_prompt=EDIT, params=base.replace(output="decoded"))
    )
    residual = generate_counterfactual(
        bundle, image, ResolvedEdit(original_prompt=SOURCE, edit_prompt=EDIT, params=base), cache=cache
    )
    assert residual.report.parameters.output == "residual"
    np.testing.assert_array_equal(residual.reconstruction, decoded.reconstruction)
    # decoded: the decoded edit, so it carries the VAE round-trip error everywhere
    assert np.abs(decoded.counterfactual - image.pixels).mean() > 0.01
    # residual: the input plus (decoded edit - reconstruction) where the latent was edited (here,
    # with the random tiny model's diffuse attention, everywhere), to quantization and clipping
    assert residual.report.edited_fraction == 1.0
    expected = np.clip(image.pixels + decoded.counterfactual - decoded.reconstruction, 0, 1)
    assert np.abs(residual.counterfactual - expected).max() <= 2.5 / 255
    assert np.allclose(residual.difference, residual.counterfactual - image.pixels, atol=1e-6)


def test_identity_edit_returns_the_input_exactly_in_residual_mode(bundle):
    image = DecodedImage(np.round(xray_like(64, 64, seed=5) * 255) / 255, 8)
    params = EditParams(steps=4, self_replace_steps=(0.5,), null_text=NullTextSettings(inner_steps=1))
    cf = generate_counterfactual(bundle, image, ResolvedEdit(original_prompt=SOURCE, edit_prompt=SOURCE, params=params))
    np.testing.assert_array_equal(cf.counterfactual, image.pixels)
    assert np.abs(cf.difference).max() == 0.0
    # the files written are the ones the report declares (and the API links)
    assert tuple(cf.files()) == cf.report.file_names == tuple(n for n in FILE_NAMES if not n.endswith(".dcm"))


def test_the_model_s_blend_thresholds_apply_unless_the_request_sets_one(bundle, tmp_path):
    """The random tiny model attends almost uniformly: a cut near 1 leaves part of the latent as it was."""
    image = DecodedImage(xray_like(64, 64, seed=6), 8)
    cache = InversionCache(tmp_path)
    params = EditParams(steps=6, self_replace_steps=(0.5,), null_text=NullTextSettings(inner_steps=2))
    tight = replace(bundle, blend_maps=BlendMaps(word_thresholds={"support": 0.995, "devices": 0.995}))
    models_cut = generate_counterfactual(
        tight, image, ResolvedEdit(original_prompt=SOURCE, edit_prompt=EDIT, params=params), cache=cache
    )
    asked_cut = generate_counterfactual(
        bundle,
        image,
        ResolvedEdit(original_prompt=SOURCE, edit_prompt=EDIT, params=params.replace(blend_threshold=0.995)),
        cache=cache,
    )
    overridden = generate_counterfactual(
        tight,
        image,
        ResolvedEdit(original_prompt=SOURCE, edit_prompt=EDIT, params=params.replace(blend_threshold=0.3)),
        cache=cache,
    )
    assert 0.0 < models_cut.report.edited_fraction < 1.0
    np.testing.assert_array_equal(models_cut.counterfactual, asked_cut.counterfactual)
    assert overridden.report.edited_fraction == 1.0
    assert (models_cut.report.blend_threshold, overridden.report.blend_threshold) == (0.995, 0.3)


def test_edited_regions_are_where_a_candidate_latent_differs_from_the_source():
    latents = torch.zeros(3, 4, 8, 8)
    latents[1, 2, 3, 5] = 0.5
    latents[2] = 1.0
    regions = edited_regions(latents, 32)
    assert regions.shape == (2, 32, 32)
    assert regions[0].sum() == 16 and regions[0, 12:16, 20:24].all()
    assert regions[1].all()
