"""A batch's manifest: CheXpert or prompt columns, resolved row by row, every bad cell named by
line and column, rows the edit does not change skipped; what spreadsheets write read as written,
anything else refused by line; the one name rule for paths and the outputs named after them."""

import csv
import io
import posixpath
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.request.manifest import (
    DELIMITERS,
    InvalidPath,
    ManifestInvalid,
    clean_path,
    find_file,
    output_stem,
    read_manifest,
    read_rows,
)
from models.request.resolve import EditRequest
from service.contract.datasets import LAYOUT, dataset_names
from tests.helpers import fuzz

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
        ("Path,Edema\nä.png,1\n".encode("latin-1"), "line 2: the manifest is not UTF-8"),
        (b'Path,Edema\na.png,1\n"b.png,1\nc.png,0\n', "line 3: not a readable CSV row"),  # a quote never closed
        (b"Path,Edema,EDEMA\na.png,1,1\n", "line 1: the column 'Edema' appears twice"),
        (b"Path|Edema\na.png|1\n", "read with a comma, a semicolon or a tab"),
        (b"Path,Study_UID,Edema\na.png,1.2.3,1\n", "give 'Path' .* or 'study_uid' .*, not both"),
    ],
)
def test_an_unusable_file_is_refused_as_a_whole(text, needle):
    with pytest.raises(ManifestInvalid, match=needle):
        read_manifest(text, REMOVE)


def test_rows_naming_studies_become_references_named_by_their_uids():
    text = "Study_UID;series_uid;SOP_UID;Support Devices\n1.2.3;;;1\n1.2.3;1.2.3.4;1.2.3.4.5;1\n1.2.4;;;0\n"
    plan = read_manifest(text.encode(), REMOVE)
    assert not plan.errors and plan.by_reference
    first, second, skipped = plan.items
    assert (first.path, first.reference) == ("1.2.3", {"study_uid": "1.2.3"})
    assert second.path == "1.2.3/1.2.3.4/1.2.3.4.5" and second.reference["sop_uid"] == "1.2.3.4.5"
    assert skipped.skipped and skipped.reference == {"study_uid": "1.2.4"}
    assert dataset_names(second.path, ["report.dcm"]) == {"report.dcm": "reports/1.2.3/1.2.3.4/1.2.3.4.5.dcm"}
    bad = read_manifest(
        b"study_uid,sop_uid,Edema\n1.2.x,,1\n,1.2,1\n1.2.3,1.2,1\n1.2.3,1.2,0\n1.2.9,1." + b"1" * 70 + b",1\n", REMOVE
    )
    assert [(e.line, e.column, e.message.split(":")[0]) for e in bad.errors] == [
        (2, "study_uid", "not a DICOM UID (digits and dots, 64 at most)"),
        (3, "study_uid", "empty"),
        (5, "study_uid", "'1.2.3/1.2' is also on line 4"),
        (6, "sop_uid", "not a DICOM UID (digits and dots, 64 at most)"),
    ]


def test_paths_are_found_as_written_or_by_their_tail(tmp_path):
    (tmp_path / "train" / "p1").mkdir(parents=True)
    (tmp_path / "train" / "p1" / "view1.jpg").write_bytes(b"x")
    assert find_file(tmp_path, "train/p1/view1.jpg") == tmp_path / "train/p1/view1.jpg"
    assert find_file(tmp_path, "CheXpert-v1.0/train/p1/view1.jpg") == tmp_path / "train/p1/view1.jpg"
    assert find_file(tmp_path, "train/p2/view1.jpg") is None


@pytest.mark.parametrize(
    "text",
    [
        "Path,Support Devices,Edema\na.png,1,0\nb.png,1\n,,\n,,,,\n\n",  # a short row, trailing empty rows
        "\ufeffPath;Support Devices;Edema\r\na.png;1;0\r\nb.png;1;\r\n",  # Excel's "CSV UTF-8", a ; locale
        "Path\tSupport Devices\tEdema\ra.png\t1\t0\rb.png\t1\t\t\t\r",  # tabs, CR line ends, extra empty cells
        'Path,Support Devices,Edema\n"a.png",1,"0"\n"b.png","1",\n',  # quoted cells
    ],
    ids=["comma", "semicolon-bom-crlf", "tab-cr", "quoted"],
)
def test_what_spreadsheets_write_is_read(text):
    plan = read_manifest(text.encode(), REMOVE)
    assert not plan.errors
    assert [(i.line, i.path) for i in plan.items] == [(2, "a.png"), (3, "b.png")]
    assert plan.items[0].request.findings == {"Support Devices": 1, "Edema": 0}


def test_extra_cells_with_values_are_refused_by_line_and_column_and_lines_are_where_rows_start():
    text = (
        "Path,notes,original_prompt,edit_prompt\n"
        'a.png,"two\nlines","chest x-ray, with devices",chest x-ray\n'
        "b.png,,x ray,x ray b,oops\n"
        "c.png,,x ray,x ray c\n"
    )
    plan = read_manifest(text.encode(), EditRequest())
    assert [(e.line, e.column) for e in plan.errors] == [(4, "column 5")]
    assert "beyond the header's 4 columns" in plan.errors[0].message
    assert [(i.line, i.path) for i in plan.items] == [(2, "a.png"), (5, "c.png")]
    assert plan.items[0].request.original_prompt == "chest x-ray, with devices"


CELL = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
NAME = st.text(st.characters(exclude_categories=("Cs", "Cc", "Zs", "Zl", "Zp")), min_size=1, max_size=12)


@fuzz(400)
@given(
    rows=st.lists(st.tuples(NAME, CELL, CELL), min_size=1, max_size=6),
    delimiter=st.sampled_from(DELIMITERS),
    quoting=st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]),
    ending=st.sampled_from(["\n", "\r\n", "\r"]),
    bom=st.booleans(),
    padding=st.integers(0, 3),
    blank_rows=st.integers(0, 3),
)
def test_any_table_a_csv_writer_writes_is_read_back_as_written(
    rows, delimiter, quoting, ending, bom, padding, blank_rows
):
    """Whatever the cells hold (delimiters, quotes, line breaks), a spreadsheet's way of writing
    them is read back cell for cell, each row at the line where it starts."""
    buffer = io.StringIO(newline="")
    if any("\r" in cell or "\n" in cell for row in rows for cell in row):
        quoting = csv.QUOTE_ALL  # as spreadsheets do; csv.writer leaves a CR unquoted unless it ends lines
    writer = csv.writer(buffer, delimiter=delimiter, quoting=quoting, lineterminator=ending)
    writer.writerow(["Path", "Notes", "original_prompt"])
    starts = []
    for row in rows:
        starts.append(len(io.StringIO(buffer.getvalue(), newline="").readlines()) + 1)
        writer.writerow([*row, *[""] * padding])
    for _ in range(blank_rows):
        writer.writerow([""] * (3 + padding))
    table = read_rows(("\ufeff" if bom else "").encode() + buffer.getvalue().encode())
    assert not table.errors
    assert table.columns == {"Path": "Path", "original_prompt": "original_prompt"}
    assert [cells for _, cells in table.rows] == [
        dict(zip(["Path", "Notes", "original_prompt"], r, strict=True)) for r in rows
    ]
    assert [line for line, _ in table.rows] == starts


@fuzz(1000)
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.text(max_size=300).map(str.encode),
        st.tuples(
            st.sampled_from(["Path,Support Devices,edit\n", "path;caption;edit_prompt\r\n", "\ufeffPath\tEdema\n"]),
            st.lists(st.text(st.sampled_from(',;\t"\r\n\\/.:=01- aäPng\x00\u0301{}[]'), max_size=40), max_size=6),
        ).map(lambda t: (t[0] + "\n".join(t[1])).encode()),
    )
)
def test_any_bytes_are_planned_or_refused_with_a_line_never_an_exception(data):
    lines = len(data.splitlines()) + 1
    try:
        plan = read_manifest(data, REMOVE)
    except ManifestInvalid as exc:
        assert str(exc)
        return
    assert all(1 <= e.line <= lines and e.column and e.message for e in plan.errors)
    for item in plan.items:
        assert 1 <= item.line <= lines and clean_path(item.path) == item.path


@pytest.mark.parametrize(
    ("written", "reason"),
    [
        ("../../evil/p000.png", "climbs"),
        ("scans/../../x.png", "climbs"),
        ("scans\\..\\..\\x.png", "climbs"),
        ("/etc/x.png", "absolute"),
        ("\\\\server\\share\\x.png", "absolute"),
        ("C:x.png", "drive letter"),
        ("", "empty"),
        ("././/", "empty"),
        ("scans/.../x.png", "only of dots"),
        ("scans/ . /x.png", "only of dots"),
        ("scans/x\x00.png", "control character"),
        ("scans/x\n.png", "control character"),
        ("x" * 251, "longer than 250 bytes"),
    ],
)
def test_the_name_rule_refuses_what_could_leave_the_folder(written, reason):
    with pytest.raises(InvalidPath, match=reason):
        clean_path(written)


def test_the_name_rule_writes_names_one_way_and_outputs_keep_uid_names_apart():
    assert clean_path("./scans//p000.png") == "scans/p000.png"
    assert clean_path("scans\\p000.png") == "scans/p000.png"
    assert clean_path(unicodedata.normalize("NFD", "scans/échographie.png")) == "scans/échographie.png"
    uid = "1.2.826.0.1.3680043.8.498.1075"
    assert output_stem(f"pacs/{uid}.11") == f"pacs/{uid}.11"
    assert output_stem(f"pacs/{uid}.12") != output_stem(f"pacs/{uid}.11")
    assert output_stem("scans/a.PNG") == output_stem("scans/a.dcm") == "scans/a"
    assert output_stem(".png") == ".png"


@fuzz(1000)
@given(st.one_of(st.text(), st.text(st.sampled_from("./\\:a\u0301é \x00"), max_size=20)))
def test_a_clean_name_stays_under_its_folder_and_so_do_its_outputs(written):
    try:
        clean = clean_path(written)
    except InvalidPath:
        return
    assert clean_path(clean) == clean and clean == unicodedata.normalize("NFC", clean)
    assert clean and not clean.startswith("/") and "\\" not in clean
    assert all(part not in ("", ".", "..") for part in clean.split("/"))
    root = "/data/out"
    for name in [clean, *dataset_names(clean, LAYOUT).values()]:
        assert posixpath.normpath(posixpath.join(root, name)).startswith(root + "/")


@pytest.mark.parametrize(
    ("paths", "clash"),
    [
        (["scans/a.png", "scans/a.dcm"], "same outputs as line 2"),
        (["scans/a.png", "SCANS/A.PNG"], "same outputs as line 2"),
        (["scans/a.png", "scans/a.png/b.png"], "a folder 'scans/a.png', a file of line 2"),
    ],
)
def test_rows_whose_outputs_would_meet_are_refused(paths, clash):
    text = "Path,Support Devices\n" + "".join(f"{p},1\n" for p in paths)
    plan = read_manifest(text.encode(), REMOVE)
    assert [(e.line, e.column) for e in plan.errors] == [(3, "Path")] and clash in plan.errors[0].message
    assert [i.line for i in plan.items] == [2]


def test_uid_named_files_each_get_their_own_outputs():
    uids = ["1.2.826.0.1.3680043.8.498.11", "1.2.826.0.1.3680043.8.498.12"]
    plan = read_manifest(("Path,Support Devices\n" + "".join(f"{u},1\n" for u in uids)).encode(), REMOVE)
    assert not plan.errors
    names = [set(dataset_names(i.path, LAYOUT).values()) for i in plan.items]
    assert names[0].isdisjoint(names[1]) and "counterfactuals/1.2.826.0.1.3680043.8.498.11.png" in names[0]


def test_paths_are_found_composed_or_decomposed(tmp_path):
    decomposed = tmp_path / unicodedata.normalize("NFD", "échographie.png")
    decomposed.write_bytes(b"x")
    (tmp_path / "plain.png").write_bytes(b"x")
    composed = unicodedata.normalize("NFC", "CheXpert-v1.0/échographie.png")  # as a manifest's Path is, once clean
    assert find_file(tmp_path, composed) == decomposed
    assert find_file(tmp_path, "CheXpert-v1.0/plain.png") == tmp_path / "plain.png"
