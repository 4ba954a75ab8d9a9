"""``prism bench-speed``'s measurement: every mode, cold and cached, per phase."""

import json

from models.evaluation.speed import PHASES, SpeedReport, bench_speed, smooth_image
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
