"""PRISM's caption template (Code Listing 1) and findings given as JSON or Label=value pairs."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.request.errors import InvalidInput
from models.request.findings import CONDITIONS, LABELS, caption, findings_prompts, parse_labels
from tests.helpers import fuzz

ROWS = [
    ({}, "Normal chest X-ray with no significant findings"),
    ({c: 0 for c in CONDITIONS}, "Normal chest X-ray with no significant findings"),
    ({"Cardiomegaly": -1, "Edema": None, "Fracture": 0}, "Normal chest X-ray with no significant findings"),
    ({"Support Devices": 1}, "Chest X-ray showing Support Devices"),
    ({"Support Devices": 1.0, "Cardiomegaly": 1, "Edema": -1}, "Chest X-ray showing Cardiomegaly, Support Devices"),
    ({"No Finding": 1}, "Chest X-ray showing No Finding"),
    ({"Pleural Effusion": 1, "No Finding": 1, "Pneumonia": 0}, "Chest X-ray showing No Finding, Pleural Effusion"),
    (
        {c: 1 for c in CONDITIONS},
        "Chest X-ray showing No Finding, Enlarged Cardiomediastinum, Cardiomegaly, Lung Opacity, Lung Lesion, "
        "Edema, Consolidation, Pneumonia, Atelectasis, Pneumothorax, Pleural Effusion, Pleural Other, Fracture, "
        "Support Devices",
    ),
]


@pytest.mark.parametrize(("labels", "expected"), ROWS)
def test_captions_follow_the_template_exactly(labels, expected):
    assert caption(labels) == expected


def test_labels_parse_from_json_or_pairs_case_insensitively():
    expected = {"Support Devices": 1, "Pleural Effusion": 0, "Edema": -1, "Fracture": None}
    assert parse_labels('{"support devices": 1, "Pleural Effusion": 0, "Edema": -1, "Fracture": null}', "f") == expected
    assert parse_labels("Support Devices=1; pleural effusion=0, Edema=-1.0, Fracture=", "f") == expected
    assert parse_labels({"SUPPORT DEVICES": "1"}, "f") == {"Support Devices": 1}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('{"Pacemaker": 1}', "not one of the 14"),
        ("Edema=2", "not a label"),
        ("Edema=yes", "not a label"),
        ("Edema", "not 'Condition=label'"),
        ("[1, 2]", "not 'Condition=label'"),
        ('{"Edema": 1', "not a valid JSON"),
        ('{"Edema": ' + "[" * 100_000 + "]" * 100_000 + "}", "not a valid JSON"),  # deeper than the parser recurses
        ('{"Edema": 1' + "0" * 5000 + "}", "not a valid JSON"),  # over Python's 4300 digits
        ('{"Edema": 1' + "0" * 400 + "}", "not a label"),  # beyond a float
    ],
    ids=["unknown", "two", "yes", "no-value", "array", "unclosed", "deep", "digits", "overflow"],
)
def test_bad_labels_name_the_field(text, needle):
    with pytest.raises(InvalidInput) as info:
        parse_labels(text, "findings")
    assert info.value.field == "findings" and needle in info.value.message


def test_an_edit_gives_both_prompts_and_the_changed_conditions():
    original, edited, changed = findings_prompts({"Support Devices": 1, "Cardiomegaly": 1}, {"Support Devices": 0})
    assert original == "Chest X-ray showing Cardiomegaly, Support Devices"
    assert edited == "Chest X-ray showing Cardiomegaly"
    assert changed == ("Support Devices",)
    _, edited, changed = findings_prompts({"Edema": -1}, {"Edema": 1, "No Finding": 0})
    assert edited == "Chest X-ray showing Edema" and changed == ("Edema",)


def test_an_edit_that_changes_no_presence_is_refused():
    with pytest.raises(InvalidInput) as info:
        findings_prompts({"Edema": -1}, {"Edema": 0})
    assert info.value.field == "edit"


LABEL_TEXT = st.one_of(
    st.text(),
    st.text(st.sampled_from('{}[]":,;= 0123456789.eE+-nulltrueEdema'), max_size=60),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.integers(10**300, 10**320) | st.floats() | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from([*CONDITIONS, "x"]), inner, max_size=3)
        ),
    ).map(json.dumps),
    st.tuples(st.sampled_from(["[", '{"Edema": ']), st.integers(0, 5000)).map(lambda p: p[0] * p[1]),
    st.integers(4000, 5000).map(lambda n: '{"Edema": 1' + "0" * n + "}"),
)
"""Any text, label-like text, any JSON (numbers past a float's range too), nesting deeper than the
parser recurses, integers over Python's 4300 digits."""


@fuzz(1000)
@given(LABEL_TEXT)
def test_any_text_is_labels_or_a_refusal_naming_the_field(text):
    try:
        labels = parse_labels(text, "findings")
    except InvalidInput as exc:
        assert exc.field == "findings" and exc.message
        return
    assert set(labels) <= set(CONDITIONS) and all(v is None or v in LABELS for v in labels.values())
