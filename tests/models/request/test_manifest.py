"""A batch's manifest: CheXpert or prompt columns, resolved row by row, every bad cell named by
line and column, rows the edit does not change skipped."""

import pytest

from models.request.manifest import ManifestInvalid, find_file, read_manifest
from models.request.resolve import EditRequest

REMOVE = EditRequest(edit="Support Devices=0", steps=7)


def test_chexpert_rows_become_edits_and_rows_without_the_finding_are_skipped():
    text = "\ufeffpath, Support Devices ,cardiomegaly\na.png,1,1\nb.png,0,\nc.png,-1,1\n\n"
    plan = read_manifest(text.encode(), REMOVE)
    assert not plan.errors
    a, b, c = plan.items
    assert (a.line, b.line, c.line) == (2, 3, 4)
    assert a.edit.original_prompt == "Chest X-ray showing Cardiomegaly, Support Devices"
    assert a.edit.edit_prompt == "Chest X-ray showing Cardiomegaly"
    assert a.edit.params.steps == 7 and a.edit.params.blend_words == ("Support Devices",)
    assert b.edit is None and "changes no condition" in b.skipped
    assert c.edit is None and c.skipped  # uncertain (-1) is not present: nothing to remove


def test_a_row_edit_overrides_the_batch_edit_and_prompt_rows_take_the_batch_default():
    plan = read_manifest(b"Path,Edema,edit\na.png,0,Edema=1\nb.png,1,\n", REMOVE.model_copy(update={"edit": None}))
    assert plan.errors[0].line == 3 and plan.errors[0].column == "edit"
    assert plan.items[0].edit.edit_prompt == "Chest X-ray showing Edema"
    base = EditRequest(edit_prompt="chest x-ray without devices")
    plan = read_manifest(b"Path,caption,edit_prompt\na.png,chest x-ray with devices,\nb.png,x ray,xray b\n", base)
    assert not plan.errors
    assert [i.edit.edit_prompt for i in plan.items] == ["chest x-ray without devices", "xray b"]
    assert plan.items[0].edit.original_prompt == "chest x-ray with devices"


def test_every_bad_cell_is_listed_by_line_and_column():
    text = (
        "Path,Support Devices,Edema\n"
        "a.png,1,maybe\n"  # not a label
        ",1,0\n"  # no path
        "a.png,1,0\n"  # the same image again
        "d.png,2,0\n"  # not a label
        "e.png,1,0\n"
    )
    plan = read_manifest(text.encode(), REMOVE)
    located = [(e.line, e.column) for e in plan.errors]
    assert located == [(2, "Edema"), (3, "Path"), (4, "Path"), (5, "Support Devices")]
    assert "also on line 2" in plan.errors[2].message
    assert [i.path for i in plan.items] == ["e.png"]
    long_prompt = "x " * 600
    plan = read_manifest(f"Path,original_prompt,edit_prompt\na.png,{long_prompt},b\n".encode(), EditRequest())
    assert plan.errors[0].line == 2 and plan.errors[0].column == "original_prompt"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (b"file,Edema\na.png,1\n", "'Path' column"),
        (b"Path,Edema\n", "no rows"),
        (b"Path,Edema,original_prompt\na.png,1,x\n", "not both"),
        (b"Path,caption,original_prompt\na.png,x,y\n", "not both"),
        ("Path,Edema\nä.png,1\n".encode("latin-1"), "not UTF-8"),
    ],
)
def test_an_unusable_file_is_refused_as_a_whole(text, needle):
    with pytest.raises(ManifestInvalid, match=needle):
        read_manifest(text, REMOVE)


def test_paths_are_found_as_written_or_by_their_tail(tmp_path):
    (tmp_path / "train" / "p1").mkdir(parents=True)
    (tmp_path / "train" / "p1" / "view1.jpg").write_bytes(b"x")
    assert find_file(tmp_path, "train/p1/view1.jpg") == tmp_path / "train/p1/view1.jpg"
    assert find_file(tmp_path, "CheXpert-v1.0/train/p1/view1.jpg") == tmp_path / "train/p1/view1.jpg"
    assert find_file(tmp_path, "train/p2/view1.jpg") is None
