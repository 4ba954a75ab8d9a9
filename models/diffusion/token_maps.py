"""Token mappings between a source and an edit prompt, for prompt-to-prompt's Replace and Refine."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from models.request.constants import TOKEN_WINDOW
from models.request.errors import InvalidInput
from models.request.words import word_spans


def replacement_mapper(tokenizer, source: str, edit: str) -> torch.Tensor:
    """A (77, 77) matrix M with edit_attention = source_attention @ M, for prompts of equal word count.

    Equal words map token to token. A replaced word of the same token count maps token to token
    too; otherwise its source tokens' attention spreads evenly over the new word's tokens, so the
    word's attention mass is kept (both as the reference's ``get_replacement_mapper_``). After a
    replaced word of another token count, positions stay shifted so the end token maps to the end
    token, where the reference maps position j to j and drops the source end token's attention.
    """
    src, dst = word_spans(tokenizer, source), word_spans(tokenizer, edit)
    if len(src) != len(dst):
        raise InvalidInput("edit_prompt", "replacement needs prompts with the same number of words")
    mapper = torch.zeros(TOKEN_WINDOW, TOKEN_WINDOW)
    mapper[0, 0] = 1.0
    for s, d in zip(src, dst, strict=True):
        if s.word == d.word or len(s.indices) == len(d.indices):
            for i, j in zip(s.indices, d.indices, strict=True):
                mapper[i, j] = 1.0
        else:
            for j in d.indices:
                mapper[s.start : s.stop, j] = 1.0 / len(d.indices)
    i, j = (src[-1].stop if src else 1), (dst[-1].stop if dst else 1)
    while i < TOKEN_WINDOW and j < TOKEN_WINDOW:
        mapper[i, j] = 1.0
        i, j = i + 1, j + 1
    return mapper


def _align(a: Sequence[int], b: Sequence[int]) -> list[tuple[int, int]]:
    """Global (Needleman-Wunsch) alignment: match 1, mismatch -1, gap 0; returns matched pairs."""
    n, m = len(a), len(b)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            diag = score[i - 1][j - 1] + (1 if a[i - 1] == b[j - 1] else -1)
            score[i][j] = max(diag, score[i - 1][j], score[i][j - 1])
    pairs, i, j = [], n, m
    while i > 0 and j > 0:
        if a[i - 1] == b[j - 1] and score[i][j] == score[i - 1][j - 1] + 1:
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif score[i][j] == score[i - 1][j]:
            i -= 1
        elif score[i][j] == score[i][j - 1]:
            j -= 1
        else:
            i, j = i - 1, j - 1
    return pairs[::-1]


def refinement_mapper(tokenizer, source: str, edit: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token alignment for Refine: ``index[j]`` is the source token for edit token j, ``alpha[j]``
    is 1 where the edit token is aligned to an identical source token and 0 where it is new.

    As the reference's ``get_mapper``: start and end tokens take part in the alignment, and the
    padding after the edit's end token maps position to position (j -> j), not shifted.
    """
    a = tokenizer(source).input_ids
    b = tokenizer(edit).input_ids
    index = torch.zeros(TOKEN_WINDOW, dtype=torch.long)
    alpha = torch.zeros(TOKEN_WINDOW)
    for i, j in _align(a, b):
        index[j], alpha[j] = i, 1.0
    index[len(b) :] = torch.arange(len(b), TOKEN_WINDOW)
    alpha[len(b) :] = 1.0
    return index, alpha
