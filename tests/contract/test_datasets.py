"""The dataset layout: which of a job's files a dataset holds, and the counterfactual its
``manifest.csv`` names when a request's ``outputs`` left some out."""

import pytest

from service.contract.datasets import counterfactual_name, dataset_names


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
