import pytest
import torch

from models.diffusion.token_maps import refinement_mapper, replacement_mapper
from models.request.errors import InvalidInput
from models.request.tokenizer import clip_tokenizer
from models.request.words import (
    check_prompt,
    differing_words,
    edit_words,
    finding_words,
    word_spans,
    word_token_indices,
)

SOURCE = "chest x-ray of a patient with support devices"
EDIT = "chest x-ray of a patient without support devices"


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


def test_word_spans_follow_real_tokenizer(tok):
    ids = tok(SOURCE).input_ids
    spans = word_spans(tok, SOURCE)
    assert [s.word for s in spans] == ["chest", "x-ray", "of", "a", "patient", "with", "support", "devices"]
    xray = spans[1]
    assert (xray.start, xray.stop) == (2, 5)
    assert tok.decode(ids[xray.start : xray.stop]).replace(" ", "") == "x-ray"
    assert spans[-1].stop == len(ids) - 1


def test_replace_mapper_maps_changed_word_and_keeps_others(tok):
    m = replacement_mapper(tok, SOURCE, EDIT)
    with_idx = word_spans(tok, SOURCE)[5].start
    without_idx = word_spans(tok, EDIT)[5].start
    assert m[with_idx, without_idx] == 1.0
    identity_positions = [i for i in range(77) if i != with_idx]
    assert torch.equal(m[identity_positions][:, identity_positions], torch.eye(76))
    # attention mass is preserved: every source token sends all of its attention somewhere
    assert torch.allclose(m.sum(1), torch.ones(77))


def test_replace_mapper_spreads_over_multi_token_word(tok):
    m = replacement_mapper(tok, "chest x-ray showing devices", "chest x-ray showing cardiomegaly")
    dev = word_spans(tok, "chest x-ray showing devices")[3]
    cardio = word_spans(tok, "chest x-ray showing cardiomegaly")[3]
    assert len(cardio.indices) == 4 and len(dev.indices) == 1
    assert torch.allclose(m[dev.start, cardio.start : cardio.stop], torch.full((4,), 0.25))
    # the end token after the word shifts by the 3 extra tokens
    assert m[dev.stop, cardio.stop] == 1.0


def test_replace_requires_equal_word_count(tok):
    with pytest.raises(InvalidInput):
        replacement_mapper(tok, SOURCE, "normal chest x-ray")


def test_refine_alignment_on_inserted_words(tok):
    src = "chest x-ray showing support devices"
    dst = "chest x-ray showing pleural effusion and support devices"
    index, alpha = refinement_mapper(tok, src, dst)
    src_spans, dst_spans = word_spans(tok, src), word_spans(tok, dst)
    # shared words align to their source tokens
    for word in ("chest", "showing", "support", "devices"):
        s = next(x for x in src_spans if x.word == word)
        d = next(x for x in dst_spans if x.word == word)
        assert index[d.start].item() == s.start and alpha[d.start] == 1.0
    # inserted words have no source token
    for word in ("pleural", "effusion", "and"):
        d = next(x for x in dst_spans if x.word == word)
        assert alpha[d.start : d.stop].sum() == 0
    # end token of the edit maps to the end token of the source
    assert index[dst_spans[-1].stop].item() == src_spans[-1].stop


def test_differing_words():
    assert differing_words(SOURCE, EDIT) == (["with"], ["without"])
    assert differing_words(
        "Chest X-ray showing Pleural Effusion, cardiomegaly", "chest x-ray showing cardiomegaly"
    ) == (
        ["pleural", "effusion"],
        [],
    )


def test_word_token_indices_and_missing_word(tok):
    assert word_token_indices(tok, EDIT, ["without"], "blend_words") == [8]
    assert word_token_indices(tok, EDIT, ["support devices"], "blend_words") == [9, 10]
    with pytest.raises(InvalidInput) as err:
        word_token_indices(tok, EDIT, ["pacemaker"], "blend_words")
    assert err.value.field == "blend_words" and "pacemaker" in err.value.message


def test_prompt_limits(tok):
    check_prompt(tok, " ".join(["lung"] * 75), "original_prompt")
    with pytest.raises(InvalidInput, match="78 tokens"):
        check_prompt(tok, " ".join(["lung"] * 76), "original_prompt")
    with pytest.raises(InvalidInput, match="empty"):
        check_prompt(tok, "   ", "edit_prompt")


@pytest.mark.parametrize(
    ("source", "edit", "expected"),
    [
        (
            "chest x-ray of a patient with support devices",
            "chest x-ray of a patient without support devices",
            (["support", "devices"], ["support", "devices"]),
        ),
        (
            "Chest X-ray showing Cardiomegaly, Support Devices",
            "Chest X-ray showing Cardiomegaly",
            (["support", "devices"], []),
        ),
        (
            "chest x-ray with pleural effusion",
            "chest x-ray with no pleural effusion, normal heart",
            (["pleural", "effusion"], ["pleural", "effusion", "normal", "heart"]),
        ),
        ("chest x-ray with a pacemaker", "chest x-ray with a chest tube", (["pacemaker"], ["chest", "tube"])),
    ],
)  # fmt: skip
def test_default_blend_words_are_the_findings_content_words(source, edit, expected):
    assert finding_words(source, edit) == expected
    words = edit_words(source, edit, None, None)
    assert (words.blend_source, words.blend_edit) == expected


def test_replace_maps_a_word_of_the_same_token_count_one_to_one(tok):
    """The reference maps a replaced word token to token when both have as many tokens."""
    source, edit = "chest x-ray with effusion", "chest x-ray with edema"
    s, d = word_spans(tok, source)[3], word_spans(tok, edit)[3]
    assert len(s.indices) == len(d.indices) == 2
    m = replacement_mapper(tok, source, edit)
    assert torch.equal(m[s.start : s.stop, d.start : d.stop], torch.eye(2))


def test_refine_maps_padding_position_to_position(tok):
    """The reference's get_mapper: after the edit's end token, j -> j with alpha 1."""
    src, dst = "chest x-ray", "chest x-ray showing pleural effusion"
    index, alpha = refinement_mapper(tok, src, dst)
    end_src, end_dst = len(tok(src).input_ids) - 1, len(tok(dst).input_ids) - 1
    assert index[end_dst].item() == end_src and alpha[end_dst] == 1.0  # end token to end token
    assert torch.equal(index[end_dst + 1 :], torch.arange(end_dst + 1, 77))
    assert torch.equal(alpha[end_dst + 1 :], torch.ones(76 - end_dst))
