"""``outputs``, the result files a request chooses: the default set, the list syntax of the other
list fields, result.json always among them, refusals naming the field."""

import pytest
from pydantic import ValidationError

from models.request.manifest import read_manifest
from models.request.params import FILE_NAMES, EditOptions, EditParams
from models.request.resolve import EditRequest, ResolvedEdit, resolve
from tests.helpers import EDIT, SOURCE

SMALL = ("counterfactual.png", "result.json")


def test_the_default_is_every_file_so_a_request_without_outputs_writes_what_it_did():
    assert EditOptions().outputs == EditParams().outputs == FILE_NAMES
    assert len(FILE_NAMES) == 8 and FILE_NAMES[-1] == "report.dcm" and FILE_NAMES[0] == "counterfactual.png"


@pytest.mark.parametrize(
    "value",
    [
        "counterfactual.png",  # one form field
        " counterfactual.png , result.json ",  # comma-separated
        ["counterfactual.png", "result.json"],  # repeated form fields, or several CLI arguments
        ["counterfactual.png,result.json"],
        '["counterfactual.png", "result.json"]',  # a JSON array, as generated clients send it
        ("result.json", "counterfactual.png", "counterfactual.png"),  # any order, repeats kept once
    ],
)
def test_every_list_syntax_gives_the_files_in_one_order_with_result_json(value):
    assert EditOptions(outputs=value).outputs == SMALL


def test_result_json_is_added_in_its_place_among_the_chosen():
    chosen = EditOptions(outputs="difference.dcm,difference.npy,counterfactual.dcm").outputs
    assert chosen == ("difference.npy", "result.json", "counterfactual.dcm", "difference.dcm")
    assert EditOptions(outputs="result.json").outputs == ("result.json",)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "name at least one of counterfactual.png, difference.png"),
        (" , ", "name at least one of"),
        ("[]", "name at least one of"),
        ("counterfactual.jpg", "Input should be 'counterfactual.png', 'difference.png'"),
        ("counterfactual.png,../result.json", "Input should be 'counterfactual.png'"),
        (["result.json"] * 9, "at most 8 items"),
    ],
)
def test_an_empty_list_or_an_unknown_name_is_refused_naming_outputs(value, message):
    with pytest.raises(ValidationError) as info:
        EditRequest(original_prompt=SOURCE, edit_prompt=EDIT, outputs=value)
    errors = info.value.errors()
    assert {e["loc"][0] for e in errors} == {"outputs"}
    assert any(message in e["msg"] for e in errors), errors


def test_the_chosen_files_reach_the_engine_and_survive_the_job_s_json():
    edit = resolve(EditRequest(original_prompt=SOURCE, edit_prompt=EDIT, outputs="counterfactual.png"))
    assert edit.params.outputs == SMALL
    assert ResolvedEdit.model_validate_json(edit.model_dump_json()).params.outputs == SMALL


def test_a_batch_s_outputs_apply_to_every_row():
    base = EditRequest(edit="Support Devices=0", outputs="counterfactual.png")
    plan = read_manifest(b"Path,Support Devices,Edema\na.png,1,0\nb.png,1,1\n", base)
    assert not plan.errors and [item.edit.params.outputs for item in plan.items] == [SMALL, SMALL]
