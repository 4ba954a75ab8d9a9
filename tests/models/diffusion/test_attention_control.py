import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor

from models.diffusion.attention_control import (
    BlendMaps,
    CandidateControl,
    ControlledAttnProcessor,
    LocalBlend,
    PromptToPromptControl,
)
from models.diffusion.editing import EditSpec, candidate_control
from models.diffusion.tiny import SD15_UNET
from models.request.tokenizer import clip_tokenizer
from models.request.words import word_spans

SOURCE = "chest x-ray of a patient with support devices"
EDIT = "chest x-ray of a patient without support devices"


def test_reweight_scales_exactly_the_named_word_columns():
    tok = clip_tokenizer()
    control = candidate_control(tok, SOURCE, EditSpec(EDIT, 0.5, edit_word_weight=2.0, local_blend=False))
    base = torch.rand(2, 16, 77).softmax(-1)
    unweighted = base @ control.mapper
    weighted = control.map_cross(base, torch.rand(2, 16, 77))
    without = word_spans(tok, EDIT)[5]
    assert without.word == "without"
    ratio = weighted / unweighted
    expected = torch.ones(77)
    expected[without.start : without.stop] = 2.0
    assert torch.allclose(ratio, expected.expand_as(ratio))


def test_reweight_of_named_words_and_refine_mode():
    tok = clip_tokenizer()
    spec = EditSpec("chest x-ray showing cardiomegaly", 0.5, reweight_words=("cardiomegaly",), edit_word_weight=3.0)
    control = candidate_control(tok, "chest x-ray showing support devices and cardiomegaly", spec)
    assert control.mapper is None and control.refine_index is not None
    assert set(torch.nonzero(control.equalizer != 1).flatten().tolist()) == {6, 7, 8, 9}
    assert torch.all(control.equalizer[6:10] == 3.0)


def test_local_blend_keeps_source_outside_mask():
    blend = LocalBlend(start=0.0)
    cand = CandidateControl(0.8, 0.5, blend_source_tokens=[3], blend_tokens=[4])
    maps = torch.zeros(2, 8, 8, 77)
    maps[0, 1:3, 1:3, 3] = 1.0  # the source attends to its blend word top-left
    maps[1, 5:7, 5:7, 4] = 1.0  # the candidate attends to its blend word bottom-right
    x = torch.randn(2, 4, 16, 16)
    out = blend.apply(x, maps, [cand])
    mask = blend.mask(maps, [cand], (16, 16))[0, 0].bool()
    assert not mask[:8, 8:].any() and not mask[8:, :8].any()
    assert mask[2:6, 2:6].all() and mask[10:14, 10:14].all()
    assert torch.equal(out[1][:, ~mask], x[0][:, ~mask])
    assert torch.equal(out[1][:, mask], x[1][:, mask])
    assert torch.equal(out[0], x[0])


def test_dilation_grows_the_mask_by_whole_map_cells():
    cand = CandidateControl(0.8, 0.5, blend_source_tokens=[3], blend_tokens=[])
    maps = torch.zeros(2, 8, 8, 77)
    maps[0, 3, 3, 3] = 1.0
    sizes = {d: LocalBlend(0.2, BlendMaps(dilation=d)).mask(maps, [cand], (16, 16)).sum().item() for d in (0, 1, 2)}
    assert sizes == {0: 4, 1: 36, 2: 100}


def test_blend_maps_pick_the_side_a_model_asks_for():
    assert BlendMaps().queries((64, 64)) == 256
    assert BlendMaps().queries((32, 32)) == 64
    assert BlendMaps(side=16).queries((32, 32)) == 256
    blend = LocalBlend(0.0, BlendMaps(side=16, dilation=0))
    cand = CandidateControl(0.0, 0.0, blend_source_tokens=[3], blend_tokens=[])
    control = PromptToPromptControl([cand], num_steps=4, latent_hw=(32, 32), local_blend=blend)
    coarse = torch.zeros(4, 2, 64, 77)  # (uncond, uncond, source, candidate) x 2 heads
    coarse[..., 3] = 1.0
    fine = torch.zeros(4, 2, 256, 77)
    fine[:, :, 0, 3] = 1.0  # the source's word attends to the top-left cell only
    for probs in (coarse, fine):
        control(probs.view(8, *probs.shape[2:]), True, 4)
    x = torch.randn(2, 4, 32, 32)
    out = control.after_step(x)
    changed = out[1] != x[0]
    assert changed[:, :2, :2].all() and changed.sum() == 4 * 4


@pytest.mark.parametrize(("edit_maps", "corner"), [("own", slice(30, 32)), ("replaced", slice(0, 2))])
def test_local_blend_reads_the_edit_branch_before_or_after_replacement(edit_maps, corner):
    """The reference stores the edit branch's maps after Replace has overwritten them: its mask
    follows the source word's map mapped onto the edit word; "own" follows the edit's attention."""
    mapper = torch.eye(77)
    mapper[[3, 4]] = mapper[[4, 3]]  # source token 3 <-> edit token 4
    cand = CandidateControl(1.0, 0.0, mapper=mapper, blend_source_tokens=[], blend_tokens=[4])
    blend = LocalBlend(0.0, BlendMaps(side=16, dilation=0), edit_maps)
    control = PromptToPromptControl([cand], num_steps=4, latent_hw=(32, 32), local_blend=blend)
    probs = torch.zeros(4, 2, 256, 77)  # (uncond, uncond, source, candidate) x 2 heads
    probs[..., 0] = 1.0
    probs[2, :, 0] = 0.0
    probs[2, :, 0, 3] = 1.0  # the source's word attends to the top-left cell only
    probs[3, :, 255] = 0.0
    probs[3, :, 255, 4] = 1.0  # the edit's own word attends to the bottom-right cell only
    edited = control(probs.view(8, 256, 77), True, 4).view(4, 2, 256, 77)
    assert edited[3, :, 0, 4].eq(1).all() and edited[3, :, 255, 4].eq(0).all()  # Replace moved it
    x = torch.randn(2, 4, 32, 32)
    changed = (control.after_step(x)[1] != x[0]).any(0)
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[corner, corner] = True  # one 16x16 map cell is 2x2 latent cells
    assert torch.equal(changed, expected)


def test_each_candidate_cuts_its_mask_at_its_own_threshold():
    maps = torch.zeros(3, 8, 8, 77)
    maps[0, :, :, 3] = torch.linspace(0.05, 1.0, 64).view(8, 8)  # the source word's map: a ramp to 1
    wide, narrow = (CandidateControl(0.8, 0.5, blend_source_tokens=[3], blend_threshold=t) for t in (0.3, 0.7))
    masks = LocalBlend(0.0, BlendMaps(dilation=0)).mask(maps, [wide, narrow], (8, 8))
    ramp = maps[0, :, :, 3]
    assert torch.equal(masks[0, 0], ramp > 0.3) and torch.equal(masks[1, 0], ramp > 0.7)
    assert masks[0].sum().item() == 47 and masks[1].sum().item() == 20


def test_a_model_s_word_thresholds_pick_each_candidate_s_cut():
    blend = BlendMaps(threshold=0.4, word_thresholds={"effusion": 0.6, "devices": 0.2})
    assert blend.threshold_for(["pleural", "effusion"]) == 0.4  # "pleural" has none: the lower cut wins
    assert blend.threshold_for(["effusion"]) == 0.6 and blend.threshold_for([]) == 0.4
    assert blend.threshold_for(["support", "devices"]) == 0.2
    tok = clip_tokenizer()
    for given, expected in ((None, 0.2), (0.5, 0.5)):
        control = candidate_control(tok, SOURCE, EditSpec(EDIT, 0.5), given, blend)
        assert control.blend_threshold == expected


def test_candidate_without_blend_words_is_not_blended():
    blend = LocalBlend(0.2)
    cand = CandidateControl(0.8, 0.5, blend_source_tokens=[], blend_tokens=[])
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(blend.apply(x, torch.rand(2, 4, 4, 77), [cand]), x)


def _full_size_sd15_unet() -> UNet2DConditionModel:
    """SD v1.5's UNet, every layer at its shape, whose weights are views into one block of random
    numbers per fan-in (uniform in ±1/sqrt(fan-in), as torch's default): 3.4 GB of separate weights
    take this CPU's page faults most of a minute to write, the shared blocks 0.2 GB a second."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    generator = torch.Generator().manual_seed(0)
    layers = [m for m in unet.modules() if isinstance(m, torch.nn.Linear | torch.nn.modules.conv._ConvNd)]
    sizes: dict[int, int] = {}
    for layer in layers:
        fan_in = layer.weight[0].numel()
        sizes[fan_in] = max(sizes.get(fan_in, 0), layer.weight.numel())
    pools = {fan_in: (torch.rand(n, generator=generator) * 2 - 1) / fan_in**0.5 for fan_in, n in sizes.items()}

    def view(pool: torch.Tensor, shape: torch.Size) -> torch.nn.Parameter:
        start = int(torch.randint(len(pool) - shape.numel() + 1, (), generator=generator))
        return torch.nn.Parameter(pool[start : start + shape.numel()].view(shape), requires_grad=False)

    for layer in layers:
        pool = pools[layer.weight[0].numel()]
        layer.weight = view(pool, layer.weight.shape)
        if layer.bias is not None:
            layer.bias = view(pool, layer.bias.shape)
    for norm in (m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm | torch.nn.LayerNorm)):
        norm.weight = torch.nn.Parameter(torch.ones(norm.weight.shape), requires_grad=False)
        norm.bias = torch.nn.Parameter(torch.zeros(norm.bias.shape), requires_grad=False)
    assert not any(p.is_meta for p in unet.parameters())
    return unet.eval()


def test_full_size_sd15_unet_runs_through_controlled_processors():
    unet = _full_size_sd15_unet()
    assert sum(p.numel() for p in unet.parameters()) > 800_000_000
    torch.manual_seed(1)
    x = torch.randn(1, 4, 8, 8).expand(4, -1, -1, -1)
    context = torch.randn(4, 77, 768)
    cand = CandidateControl(cross_replace_steps=0.8, self_replace_steps=0.6, mapper=torch.eye(77))
    control = PromptToPromptControl([cand], num_steps=10, latent_hw=(8, 8))
    edited = {}
    with torch.no_grad():
        unet.set_attn_processor(AttnProcessor())
        reference = unet(x, 500, encoder_hidden_states=context).sample
        for fused in (True, False):
            unet.set_attn_processor(ControlledAttnProcessor(control, fused))
            control.step = 0  # inside both windows: the candidate takes the source's attention
            edited[fused] = unet(x, 500, encoder_hidden_states=context).sample
        control.step = 9  # past both replace windows: plain attention
        plain = unet(x, 500, encoder_hidden_states=context).sample
    assert torch.allclose(plain, reference, atol=1e-4)
    assert (edited[False][3] - plain[3]).abs().max() > 1e-3
    assert torch.equal(edited[False][:3], plain[:3])  # the control touches only the candidate
    assert torch.allclose(edited[True], edited[False], atol=1e-4)  # fused where nothing is read: the same result
