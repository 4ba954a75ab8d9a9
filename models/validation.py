"""Every check of an edit request that needs only a tokenizer: run before any model work.

Torch-free, so the API answers bad requests with a 422 before anything is enqueued.
"""

from __future__ import annotations

from models.errors import InvalidInput
from models.params import EditParams
from models.words import check_prompt, prompt_words, word_token_indices


def validate_request(tokenizer, original_prompt: str, edit_prompt: str, params: EditParams) -> None:
    """Raise :class:`InvalidInput` naming the field for the first problem found."""
    params.validate()
    check_prompt(tokenizer, original_prompt, "original_prompt")
    check_prompt(tokenizer, edit_prompt, "edit_prompt")
    if params.reweight_words:
        word_token_indices(tokenizer, edit_prompt, params.reweight_words, "reweight_words")
    if params.blend_words:
        present = set(prompt_words(original_prompt)) | set(prompt_words(edit_prompt))
        for word in (w for entry in params.blend_words for w in prompt_words(entry)):
            if word not in present:
                raise InvalidInput("blend_words", f"word {word!r} occurs in neither prompt")
