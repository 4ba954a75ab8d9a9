"""CLIP-based edit scores: S_CLIP (directional similarity) and the LANCE similarities.

S_CLIP = cos(E_I(cf) - E_I(ref), E_T(P_edit) - E_T(P_orig)), on L2-normalised embeddings.
The CLIP model is passed in (loaded once with the bundle), never loaded at import time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from models.diffusion.components import ClipParts
from models.request.constants import TOKEN_WINDOW
from models.request.report import EditScores


class ClipScorer:
    """Embeds grayscale images in [0, 1] and prompts with a CLIP model."""

    def __init__(self, clip: ClipParts, device: torch.device) -> None:
        self.clip = clip
        self.device = device

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) or (N, 3, H, W) in [0, 1] -> (N, D) unit vectors."""
        x = images.float().to(self.device)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        size = self.clip.image_size
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        mean = torch.tensor(self.clip.mean, device=self.device)[None, :, None, None]
        std = torch.tensor(self.clip.std, device=self.device)[None, :, None, None]
        feats = self.clip.model.get_image_features(pixel_values=(x - mean) / std)
        return F.normalize(projected_features(feats).float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.clip.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=TOKEN_WINDOW, return_tensors="pt"
        )
        feats = self.clip.model.get_text_features(
            input_ids=tokens.input_ids.to(self.device), attention_mask=tokens.attention_mask.to(self.device)
        )
        return F.normalize(projected_features(feats).float(), dim=-1)


def projected_features(features) -> torch.Tensor:
    """transformers may return a model output instead of a tensor; take the pooled projection."""
    if isinstance(features, torch.Tensor):
        return features
    return features.pooler_output


def directional_similarity(
    image_ref: torch.Tensor, image_cf: torch.Tensor, text_orig: torch.Tensor, text_edit: torch.Tensor
) -> torch.Tensor:
    """S_CLIP for embeddings (N, D): cosine between image change and text change."""
    return F.cosine_similarity(image_cf - image_ref, (text_edit - text_orig).expand_as(image_cf), dim=-1)


def score_candidates(
    scorer: ClipScorer,
    reference: torch.Tensor,
    candidates: torch.Tensor,
    original_prompt: str,
    edit_prompts: Sequence[str],
) -> list[EditScores]:
    """Scores of each candidate image (K, 1, H, W) against one reference image (1, 1, H, W): the
    images embedded in one call, the scores read from the device once."""
    images = scorer.image_embeddings(torch.cat([reference, candidates]))
    ref, cf = images[:1], images[1:]
    texts = scorer.text_embeddings([original_prompt, *edit_prompts])
    t_orig, t_edit = texts[:1], texts[1:]
    table = torch.stack(
        [
            directional_similarity(ref, cf, t_orig, t_edit),
            cf @ ref[0],
            (ref @ t_orig[0]).expand(len(cf)),
            (cf * t_edit).sum(-1),
            t_edit @ ref[0],
        ],
        dim=1,
    )
    return [
        EditScores(
            s_clip=s_clip,
            image_similarity=image,
            text_image_before=before,
            text_image_after=after,
            edit_text_image_before=edit_before,
        )
        for s_clip, image, before, after, edit_before in table.tolist()
    ]
