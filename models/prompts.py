"""Prompt analysis for prompt-to-prompt: token spans of words, word diffs and token mappings.

Everything works on the 77-token CLIP window: position 0 is the start token, the prompt's
tokens follow, then the end token and padding.
"""

from __future__ import annotations

import difflib
import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from models.errors import InvalidInput

MAX_TOKENS = 77


@dataclass(frozen=True)
class WordSpan:
    word: str
    start: int
    stop: int

    @property
    def indices(self) -> list[int]:
        return list(range(self.start, self.stop))


def normalize_word(word: str) -> str:
    """Lower-case and strip surrounding punctuation, so 'Effusion,' matches 'effusion'."""
    return word.lower().strip(string.punctuation)


def prompt_words(prompt: str) -> list[str]:
    return [normalize_word(w) for w in prompt.split()]


def _token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def check_prompt(tokenizer, prompt: str, field: str) -> None:
    """Reject empty prompts and prompts that do not fit the 77-token window."""
    if not prompt or not prompt.strip():
        raise InvalidInput(field, "must not be empty")
    count = _token_count(tokenizer, prompt) + 2
    if count > MAX_TOKENS:
        raise InvalidInput(field, f"is {count} tokens long; the model's window is {MAX_TOKENS}")


def word_spans(tokenizer, prompt: str) -> list[WordSpan]:
    """Token positions (in the 77-token window) of each whitespace-separated word."""
    spans, cursor = [], 1
    for word in prompt.split():
        n = _token_count(tokenizer, word)
        spans.append(WordSpan(normalize_word(word), cursor, cursor + n))
        cursor += n
    return spans


def content_length(tokenizer, prompt: str) -> int:
    """Number of prompt tokens, start token included, end token excluded."""
    return 1 + _token_count(tokenizer, prompt)


def differing_words(source: str, edit: str) -> tuple[list[str], list[str]]:
    """Words removed from ``source`` and words added in ``edit`` (a word-level diff)."""
    a, b = prompt_words(source), prompt_words(edit)
    removed: list[str] = []
    added: list[str] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if tag != "equal":
            removed.extend(a[i1:i2])
            added.extend(b[j1:j2])
    return removed, added


def word_token_indices(tokenizer, prompt: str, words: Sequence[str], field: str) -> list[int]:
    """Token positions of ``words`` in ``prompt``; every word must occur in the prompt."""
    spans = word_spans(tokenizer, prompt)
    indices: list[int] = []
    for entry in words:
        for word in prompt_words(entry):
            hits = [s for s in spans if s.word == word]
            if not hits:
                raise InvalidInput(field, f"word {word!r} does not occur in the prompt")
            for span in hits:
                indices.extend(span.indices)
    return sorted(set(indices))


def replacement_mapper(tokenizer, source: str, edit: str) -> torch.Tensor:
    """A (77, 77) matrix M with edit_attention = source_attention @ M, for prompts of equal word count.

    Equal words map token to token; a replaced word spreads its source tokens' attention evenly
    over the new word's tokens, so the attention mass of the word is kept.
    """
    src, dst = word_spans(tokenizer, source), word_spans(tokenizer, edit)
    if len(src) != len(dst):
        raise InvalidInput("edit_prompt", "replacement needs prompts with the same number of words")
    mapper = torch.zeros(MAX_TOKENS, MAX_TOKENS)
    mapper[0, 0] = 1.0
    for s, d in zip(src, dst, strict=True):
        if s.word == d.word:
            for i, j in zip(s.indices, d.indices, strict=True):
                mapper[i, j] = 1.0
        else:
            for j in d.indices:
                mapper[s.start : s.stop, j] = 1.0 / len(d.indices)
    i, j = (src[-1].stop if src else 1), (dst[-1].stop if dst else 1)
    while i < MAX_TOKENS and j < MAX_TOKENS:
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
    is 1 where the edit token is aligned to an identical source token and 0 where it is new."""
    a = [tokenizer.bos_token_id, *tokenizer(source, add_special_tokens=False).input_ids]
    b = [tokenizer.bos_token_id, *tokenizer(edit, add_special_tokens=False).input_ids]
    index = torch.zeros(MAX_TOKENS, dtype=torch.long)
    alpha = torch.zeros(MAX_TOKENS)
    for i, j in _align(a, b):
        index[j], alpha[j] = i, 1.0
    for j in range(len(b), MAX_TOKENS):
        index[j], alpha[j] = min(j - len(b) + len(a), MAX_TOKENS - 1), 1.0
    return index, alpha
