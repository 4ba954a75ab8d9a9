"""How the counterfactual is formed from the decoded edit (residual, the default, and decoded), and
packs of counterfactuals."""

import io
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from pydicom import dcmread

from models.diffusion.attention_control import BlendMaps
from models.diffusion.inversion import InversionCache
from models.diffusion.packing import LeavePack
from models.imaging.files import DecodedImage, decode_image
from models.pipeline import PackItem, edited_regions, generate_counterfactual, generate_counterfactuals, pack_key
from models.request.errors import InvalidInput
from models.request.params import EditParams, NullTextSettings
from models.request.report import FILE_NAMES
from models.request.resolve import ResolvedEdit
from phantoms.bench import bench_case
from phantoms.captions import explicit_caption
from phantoms.render import render
from tests.dicom_files import encode, radiograph
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


def _pack_items(callbacks=(None, None, None)) -> list[PackItem]:
    """Three phantom counterfactuals of the built-in model (the tiny model's edits are noise, and so
    its S_CLIP) that can share a pack: other images, prompts, sweeps and outputs; 16-bit, so that
    the comparison is not of 8-bit rounding."""
    params = EditParams(steps=10, null_text=NullTextSettings(inner_steps=4))
    items = []
    for k, (task, own) in enumerate(
        [
            ("remove_devices", {}),
            ("remove_devices", {"self_replace_steps": (0.3, 0.9), "output": "decoded"}),
            ("remove_cardiomegaly", {"blend_threshold": 0.5}),
        ]
    ):
        anatomy, source, target, _ = bench_case(task, k, 128)
        edit = ResolvedEdit(
            original_prompt=explicit_caption(source), edit_prompt=explicit_caption(target), params=params.replace(**own)
        )
        items.append(PackItem(DecodedImage(render(anatomy, source), 16), edit, callbacks[k]))
    return items


def _assert_same(alone, packed) -> None:
    """A packed counterfactual is the one made alone: same candidate, intensities and S_CLIP within 1e-3."""
    assert packed.report.chosen_self_replace == alone.report.chosen_self_replace
    assert np.abs(packed.counterfactual - alone.counterfactual).max() <= 1e-3
    assert abs(packed.report.s_clip - alone.report.s_clip) <= 1e-3
    assert packed.report.edit_prompt == alone.report.edit_prompt


def test_a_pack_gives_each_item_what_it_gets_alone(builtin, tmp_path):
    items = _pack_items()
    alone = [generate_counterfactual(builtin, item.image, item.edit) for item in items]
    cache = InversionCache(tmp_path)
    generate_counterfactual(builtin, items[1].image, items[1].edit, cache=cache)  # cached: it joins at editing
    batched = generate_counterfactuals(builtin, items, cache=cache)
    for one, many in zip(alone, batched, strict=True):
        _assert_same(one, many)
    assert [b.report.inversion.cached for b in batched] == [False, True, False]
    assert [b.report.pack_size for b in batched] == [3, 3, 3] and alone[0].report.pack_size == 1
    assert "null_text" in batched[0].report.timings and "null_text" not in batched[1].report.timings
    assert min(b.report.s_clip for b in batched) > 0.1  # real edits, not noise


def test_an_item_that_leaves_or_fails_does_not_stop_the_others(builtin):
    class Canceled(LeavePack):
        pass

    def cancel_in_null_text(phase, step, total):
        if (phase, step) == ("null_text", 2):
            raise Canceled

    def cancel_in_scoring(phase, step, total):
        if phase == "scoring":
            raise Canceled

    items = _pack_items((None, cancel_in_null_text, cancel_in_scoring))
    alone = generate_counterfactual(builtin, items[0].image, items[0].edit)
    first, canceled, late = generate_counterfactuals(builtin, items)
    _assert_same(alone, first)
    assert isinstance(canceled, Canceled) and isinstance(late, Canceled)
    items[2] = replace(items[2], callback=None, keep=np.ones((3, 3), bool))  # a mask of the wrong size
    first, _, failed = generate_counterfactuals(builtin, items)
    _assert_same(alone, first)
    assert isinstance(failed, InvalidInput) and failed.field == "mask"


def test_only_edits_with_one_pack_key_share_a_pack(bundle):
    items = _pack_items()
    sdedit = replace(items[0], edit=items[0].edit.model_copy(update={"params": EditParams(method="sdedit")}))
    assert pack_key(sdedit.edit.params) is None
    other_steps = replace(items[1], edit=items[1].edit.model_copy(update={"params": EditParams(steps=7)}))
    assert pack_key(items[0].edit.params) == pack_key(items[1].edit.params) != pack_key(other_steps.edit.params)
    for mixed in ([items[0], sdedit], [items[0], other_steps]):
        with pytest.raises(ValueError, match="cannot share a pack"):
            generate_counterfactuals(bundle, mixed)


def test_files_are_the_chosen_outputs_and_the_report_names_exactly_those(bundle, tmp_path, monkeypatch):
    study = decode_image(encode(radiograph(48, 40)[0]))
    params = EditParams(steps=4, self_replace_steps=(0.5,), null_text=NullTextSettings(inner_steps=1))
    cache = InversionCache(tmp_path)

    def run(image: DecodedImage, outputs: str | tuple[str, ...]):
        edit = ResolvedEdit(original_prompt=SOURCE, edit_prompt=EDIT, params=params.replace(outputs=outputs))
        return generate_counterfactual(bundle, image, edit, cache=cache)

    full = run(study, FILE_NAMES)
    assert tuple(full.files()) == full.report.file_names == FILE_NAMES  # a DICOM input's seven
    dicom_only = run(study, "counterfactual.dcm")
    # outputs choose files only: the same inversion (from the cache) and the same pack
    assert dicom_only.report.inversion.cached and dicom_only.report.inversion.key == full.report.inversion.key
    assert pack_key(dicom_only.report.parameters) == pack_key(full.report.parameters)
    files = dicom_only.files()
    assert tuple(files) == dicom_only.report.file_names == ("result.json", "counterfactual.dcm")
    assert json.loads(files["result.json"])["parameters"]["outputs"] == ["result.json", "counterfactual.dcm"]
    written = dcmread(io.BytesIO(files["counterfactual.dcm"])).pixel_array
    np.testing.assert_array_equal(written, dcmread(io.BytesIO(full.files()["counterfactual.dcm"])).pixel_array)

    def not_asked(*_):
        raise AssertionError("encoded a file that was not asked for")

    monkeypatch.setattr("models.pipeline.dicom_outputs", not_asked)
    monkeypatch.setattr("models.pipeline.encode_npy", not_asked)
    png = run(study, ("counterfactual.png", "result.json"))
    assert tuple(png.files()) == png.report.file_names == ("counterfactual.png", "result.json")
    np.testing.assert_array_equal(png.counterfactual, full.counterfactual)
    # a .dcm asked of a PNG input is not written: the DICOM files are for DICOM inputs only
    not_dicom = run(DecodedImage(study.pixels, study.bit_depth), "counterfactual.dcm,difference.png")
    assert not_dicom.report.parameters.outputs == ("difference.png", "result.json", "counterfactual.dcm")
    assert tuple(not_dicom.files()) == not_dicom.report.file_names == ("difference.png", "result.json")
