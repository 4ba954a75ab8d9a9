import torch
import torch.nn.functional as F

from models.scoring.clip import ClipScorer, directional_similarity, score_candidates


def test_s_clip_equals_direct_computation(bundle):
    scorer = ClipScorer(bundle.clip, bundle.device)
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(1, 1, 64, 64, generator=g)
    cands = torch.rand(3, 1, 64, 64, generator=g)
    orig, edit = "chest x-ray showing support devices", "chest x-ray without support devices"
    scores = score_candidates(scorer, ref, cands, orig, [edit] * 3)

    model = bundle.clip.model
    mean = torch.tensor(bundle.clip.mean)[None, :, None, None]
    std = torch.tensor(bundle.clip.std)[None, :, None, None]

    def img(x):
        x = F.interpolate(x.expand(-1, 3, -1, -1), size=(32, 32), mode="bicubic", antialias=True).clamp(0, 1)
        e = model.get_image_features(pixel_values=(x - mean) / std)
        e = e if isinstance(e, torch.Tensor) else e.pooler_output
        return e / e.norm(dim=-1, keepdim=True)

    def txt(p):
        t = bundle.clip.tokenizer([p], padding="max_length", max_length=77, return_tensors="pt")
        e = model.get_text_features(input_ids=t.input_ids, attention_mask=t.attention_mask)
        e = e if isinstance(e, torch.Tensor) else e.pooler_output
        return e / e.norm(dim=-1, keepdim=True)

    with torch.no_grad():
        e_ref, e_cf, t_o, t_e = img(ref)[0], img(cands), txt(orig)[0], txt(edit)[0]
    for k, s in enumerate(scores):
        d_img, d_txt = e_cf[k] - e_ref, t_e - t_o
        expected = torch.dot(d_img, d_txt) / (d_img.norm() * d_txt.norm())
        assert abs(s.s_clip - expected.item()) < 1e-5
        assert abs(s.image_similarity - torch.dot(e_cf[k], e_ref).item()) < 1e-5
        assert abs(s.text_image_after - torch.dot(e_cf[k], t_e).item()) < 1e-5
        assert abs(s.text_image_before - torch.dot(e_ref, t_o).item()) < 1e-5
        assert -1 <= s.s_clip <= 1


def test_directional_similarity_signs():
    ref = torch.tensor([[1.0, 0.0]])
    t_orig, t_edit = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    toward = torch.tensor([[1.0, 1.0]])
    away = torch.tensor([[1.0, -1.0]])
    assert directional_similarity(ref, toward, t_orig, t_edit).item() == 1.0
    assert directional_similarity(ref, away, t_orig, t_edit).item() == -1.0
