"""The dataset layout: which of a job's files a dataset holds, named by the manifest's name rule,
the counterfactual its ``manifest.csv`` names when a request's ``outputs`` left some out, and a
``manifest.csv`` read back or refused."""

import pytest

from models.request.manifest import InvalidPath
from service.contract.datasets import NotADatasetManifest, counterfactual_name, dataset_names, read_manifest_csv


@pytest.mark.parametrize(
    ("written", "named"),
    [
        (("counterfactual.png", "difference.npy", "result.json", "counterfactual.dcm"), "counterfactuals/a/b.png"),
        (("result.json", "counterfactual.dcm"), "counterfactuals/a/b.dcm"),
        (("difference.png", "result.json"), ""),
    ],
)
def test_the_manifest_names_the_png_else_the_dicom_else_nothing(written, named):
    names = dataset_names("a/b.dcm", written)
    assert set(names) == set(written) and names["result.json"] == "results/a/b.json"
    assert counterfactual_name(names) == named


def test_outputs_are_named_by_the_manifest_rule_and_keep_uid_names_apart():
    eleven = dataset_names("pacs\\1.2.826.0.1.3680043.8.498.11", ["counterfactual.png", "result.json"])
    twelve = dataset_names("./pacs/1.2.826.0.1.3680043.8.498.12", ["counterfactual.png", "result.json"])
    assert eleven == {
        "counterfactual.png": "counterfactuals/pacs/1.2.826.0.1.3680043.8.498.11.png",
        "result.json": "results/pacs/1.2.826.0.1.3680043.8.498.11.json",
    }
    assert set(eleven.values()).isdisjoint(twelve.values())
    with pytest.raises(InvalidPath, match="climbs"):
        dataset_names("../../evil/p000.png", ["counterfactual.png"])


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"line,path\n2,a.png\n", "line 2: status: Field required"),
        (b"line,path,status\nsecond,a.png,succeeded\n", "line 2: line"),
        ("line,path,status\n2,ä.png,succeeded\n".encode("latin-1"), "not UTF-8"),
    ],
)
def test_a_manifest_csv_this_layout_did_not_write_is_refused_by_line(data, needle):
    with pytest.raises(NotADatasetManifest, match=needle):
        read_manifest_csv(data)
    assert read_manifest_csv(b"line,path,status,extra\n2,a.png,succeeded,x,y\n")[0].path == "a.png"
