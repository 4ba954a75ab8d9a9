"""The timing benchmarks' measurements: ``bench-speed`` (every mode, cold and cached, per phase),
``bench-profile`` (null-text's inner steps under torch.profiler), ``bench-precision``."""

import copy
import json
from dataclasses import replace

from models.diffusion.components import DTYPES
from models.evaluation.speed import (
    PHASES,
    SpeedReport,
    bench_speed,
    compare_precisions,
    profile_null_text,
    smooth_image,
)
from models.request.params import EditParams, NullTextSettings
from tests.helpers import EDIT, SOURCE


def test_every_mode_is_timed_cold_and_cached(bundle):
    params = EditParams(steps=3, self_replace_steps=(0.5,), null_text=NullTextSettings(inner_steps=1))
    report = bench_speed(bundle, smooth_image(32), (SOURCE, EDIT, "chest x-ray"), params, repeats=1)
    assert [(r.mode, r.cached) for r in report.rows] == [
        (mode, cached) for mode in ("null_text", "negative_prompt", "direct") for cached in (False, True)
    ]
    for row in report.rows:
        assert row.seconds > 0 and set(row.phases) <= set(PHASES) and "editing" in row.phases
        assert ("inversion" in row.phases) == (not row.cached)
        assert ("null_text" in row.phases) == (row.mode == "null_text" and not row.cached)
        assert ("offsets" in row.phases) == (row.mode == "direct" and not row.cached)
        assert row.seconds >= sum(row.phases.values()) * 0.9
    assert report.peak_memory_mib > 0 and report.steps == 3 and "threads" in report.device
    table = report.markdown()
    assert table.count("\n| ") == 2 + 6 and "| direct | cached |" in table
    assert SpeedReport.model_validate(json.loads(report.model_dump_json())) == report


def test_the_null_text_profile_traces_its_inner_steps(bundle, tmp_path):
    summary = profile_null_text(bundle, smooth_image(48), SOURCE, 2, tmp_path)
    trace = json.loads((tmp_path / "trace.json").read_text())
    names = [event.get("name", "") for event in trace["traceEvents"]]
    # the UNet runs 2 inner steps (forward and backward), plus the conditional and advancing passes
    assert sum(name.startswith("aten::convolution_backward") for name in names) > 0
    assert "one null-text outer step of 2 inner steps" in summary and "Self CPU" in summary


def test_precisions_are_compared_on_one_input(bundle):
    params = EditParams(steps=3, self_replace_steps=(0.4, 0.8), null_text=NullTextSettings(inner_steps=1))
    loaded = []

    def load(dtype):
        loaded.append(dtype)
        return replace(bundle, unet=copy.deepcopy(bundle.unet).to(DTYPES[dtype]), dtype=DTYPES[dtype])

    report = compare_precisions(load, ("float32", "bfloat16", "float32"), smooth_image(48), (SOURCE, EDIT), params)
    assert loaded == ["float32", "bfloat16", "float32"] and [r.dtype for r in report.rows] == loaded
    first, reduced, again = report.rows
    assert (first.max_counterfactual_diff, first.s_clip_diff, again.max_counterfactual_diff) == (0, 0, 0)
    assert reduced.max_counterfactual_diff > 0 and reduced.s_clip_diff == abs(reduced.s_clip - first.s_clip)
    assert "| bfloat16 |" in report.markdown()
