"""Every check of an edit request that needs only a tokenizer: run before any model work.

Torch-free, so the API answers bad requests with a 422 before anything is enqueued. Parameter
ranges are checked when :class:`~models.request.params.EditParams` is built; these are the checks that
need the prompts.
"""

from __future__ import annotations

from models.request.params import EditOptions
from models.request.words import check_prompt, edit_words, word_token_indices


def validate_request(tokenizer, original_prompt: str, edit_prompt: str, params: EditOptions) -> None:
    """Raise :class:`~models.request.errors.InvalidInput` naming the field for the first problem found."""
    check_prompt(tokenizer, original_prompt, "original_prompt")
    check_prompt(tokenizer, edit_prompt, "edit_prompt")
    words = edit_words(original_prompt, edit_prompt, params.reweight_words, params.blend_words)
    word_token_indices(tokenizer, edit_prompt, words.reweight, "reweight_words")
