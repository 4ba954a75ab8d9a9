"""Words of prompts: their token spans in the 77-token CLIP window, diffs, and checks.

Position 0 of the window is the start token, the prompt's tokens follow, then the end token
and padding. Torch-free: the API uses it to validate requests before enqueueing.
"""

from __future__ import annotations

import difflib
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from models.request.constants import TOKEN_WINDOW
from models.request.errors import InvalidInput


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
    """Reject empty prompts, control characters and prompts that do not fit the 77-token window."""
    if not prompt or not prompt.strip():
        raise InvalidInput(field, "must not be empty")
    if "\ufffd" in prompt:
        raise InvalidInput(field, "is not valid UTF-8 text")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn") for c in prompt):
        raise InvalidInput(field, "must not contain control or unassigned characters")
    count = _token_count(tokenizer, prompt) + 2
    if count > TOKEN_WINDOW:
        raise InvalidInput(field, f"is {count} tokens long; the model's window is {TOKEN_WINDOW}")


def word_spans(tokenizer, prompt: str) -> list[WordSpan]:
    """Token positions (in the 77-token window) of each whitespace-separated word."""
    spans, cursor = [], 1
    for word in prompt.split():
        n = _token_count(tokenizer, word)
        spans.append(WordSpan(normalize_word(word), cursor, cursor + n))
        cursor += n
    return spans


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


FUNCTION_WORDS = frozenset(
    "a an the of with without no not any and or in on showing shows show has have is are there signs evidence".split()
)
"""Words that carry no finding: a changed word from this set points at the phrase that follows it."""


def _phrase_after(words: list[str], start: int) -> list[str]:
    """The content words of the phrase starting at ``start`` (raw words), to a comma or conjunction."""
    phrase = []
    for raw in words[start:]:
        word = normalize_word(raw)
        if word in ("and", "or"):
            break
        if word not in FUNCTION_WORDS:
            phrase.append(word)
        if raw.endswith((",", ";", ".")):
            break
    return phrase


def finding_words(source: str, edit: str) -> tuple[list[str], list[str]]:
    """LocalBlend's default words in each prompt: the content words that differ, or, where only
    function words differ ("with" -> "without", "no" added), the phrase that follows them.

    "chest x-ray of a patient with support devices" -> "... without support devices" blends on
    "support devices" in both prompts; "Chest X-ray showing Cardiomegaly, Support Devices" ->
    "Chest X-ray showing Cardiomegaly" on "support devices" in the source.
    """
    a_raw, b_raw = source.split(), edit.split()
    a, b = [normalize_word(w) for w in a_raw], [normalize_word(w) for w in b_raw]
    in_source: list[str] = []
    in_edit: list[str] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        content_a = [w for w in a[i1:i2] if w not in FUNCTION_WORDS]
        content_b = [w for w in b[j1:j2] if w not in FUNCTION_WORDS]
        if content_a or content_b:
            in_source += content_a
            in_edit += content_b
        else:
            in_source += _phrase_after(a_raw, i2)
            in_edit += _phrase_after(b_raw, j2)
    return in_source, in_edit


@dataclass(frozen=True)
class EditWords:
    """The words prompt-to-prompt acts on for one edit: reweighted (in the edit prompt) and
    blended (LocalBlend's region, from each prompt)."""

    reweight: list[str]
    blend_source: list[str]
    blend_edit: list[str]


def edit_words(
    source: str, edit: str, reweight_words: Sequence[str] | None, blend_words: Sequence[str] | None
) -> EditWords:
    """Resolve the word choices of an edit; ``None`` means the words the edit adds (reweight) and
    :func:`finding_words` (blend).

    A blend word must occur in at least one prompt; it blends where it occurs.
    """
    _, added = differing_words(source, edit)
    reweight = list(reweight_words) if reweight_words is not None else added
    if blend_words is None:
        return EditWords(reweight, *finding_words(source, edit))
    in_source, in_edit = set(prompt_words(source)), set(prompt_words(edit))
    words = [w for entry in blend_words for w in prompt_words(entry)]
    for word in words:
        if word not in in_source and word not in in_edit:
            raise InvalidInput("blend_words", f"word {word!r} occurs in neither prompt")
    return EditWords(reweight, [w for w in words if w in in_source], [w for w in words if w in in_edit])


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
