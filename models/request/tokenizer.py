"""The CLIP BPE tokenizer (the one SD v1.5 uses) from the vocabulary shipped in the repo.

Torch-free, so the API process can count tokens and check words before enqueueing.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

from models.request.constants import TOKEN_WINDOW

ASSETS = Path(__file__).parents[1] / "assets" / "clip_tokenizer"


@lru_cache(maxsize=1)
def clip_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer with the 77-token window, built from ``assets/clip_tokenizer`` (no download)."""
    return CLIPTokenizer(
        str(ASSETS / "vocab.json"),
        str(ASSETS / "merges.txt"),
        model_max_length=TOKEN_WINDOW,
        pad_token="<|endoftext|>",
    )
