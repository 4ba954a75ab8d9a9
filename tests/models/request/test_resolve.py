"""A request is resolved once: prompts or findings to the two prompts and EditParams, every
check that needs no model, one message per rule."""

import pytest

from models.request.errors import InvalidInput
from models.request.params import EditParams
from models.request.resolve import EditRequest, ResolvedEdit, resolve
from tests.helpers import EDIT, SOURCE


def test_prompts_pass_through_with_the_engine_defaults():
    edit = resolve(EditRequest(original_prompt=SOURCE, edit_prompt=EDIT, steps=7))
    assert edit == ResolvedEdit(original_prompt=SOURCE, edit_prompt=EDIT, params=EditParams(steps=7))


def test_findings_become_the_caption_template_and_set_blend_words_and_targets():
    edit = resolve(EditRequest(findings={"Support Devices": 1, "Edema": 0}, edit={"Support Devices": 0}))
    assert edit.original_prompt == "Chest X-ray showing Support Devices"
    assert edit.edit_prompt == "Normal chest X-ray with no significant findings"
    assert edit.params.blend_words == ("Support Devices",)
    assert edit.params.classifier_targets == {"Support Devices": 0}


def test_a_resolved_edit_round_trips_through_json_unchanged():
    edit = resolve(EditRequest(findings="Cardiomegaly=1", edit="Cardiomegaly=0", self_replace_steps="0.4,0.6"))
    assert ResolvedEdit.model_validate_json(edit.model_dump_json()) == edit


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"findings": {"Edema": 1}, "original_prompt": SOURCE, "edit": {"Edema": 0}}, "findings"),
        ({"findings": {"Edema": 1}}, "edit"),
        ({"edit": {"Edema": 0}}, "findings"),
        ({"findings": {"Edema": 1}, "edit": {"Edema": 1}}, "edit"),
        ({"original_prompt": SOURCE, "edit_prompt": EDIT, "method": "guided"}, "classifier_targets"),
        ({"original_prompt": "", "edit_prompt": EDIT}, "original_prompt"),
        ({"original_prompt": SOURCE, "edit_prompt": " ".join(["lung"] * 80)}, "edit_prompt"),
        ({"original_prompt": SOURCE, "edit_prompt": EDIT, "reweight_words": "zebra"}, "reweight_words"),
    ],
)
def test_each_rule_names_its_field(request_fields, field):
    with pytest.raises(InvalidInput) as info:
        resolve(EditRequest(**request_fields))
    assert info.value.field == field


def test_the_guided_rule_has_one_message():
    with pytest.raises(InvalidInput) as info:
        resolve(EditRequest(original_prompt=SOURCE, edit_prompt=EDIT, method="guided"))
    assert info.value.message == "the guided method needs the findings to remove (0) or add (1), or findings and edit"
