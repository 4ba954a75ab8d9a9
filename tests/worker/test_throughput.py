"""``prism bench-throughput``'s measurement: the same jobs through a real worker at each pack size,
timed from the jobs' own timestamps and compared with their pack-of-one results."""

import subprocess

from models.imaging.files import encode_png
from models.request.params import EditParams, NullTextSettings
from models.request.resolve import ResolvedEdit
from service.contract.settings import Settings
from tests.helpers import EDIT, SOURCE, xray_like
from tests.stack import prism
from worker.throughput import measure_throughput


def test_every_pack_size_runs_the_same_jobs_and_is_compared_with_pack_one(bundle, redis_server, tmp_path):
    params = EditParams(steps=3, self_replace_steps=(0.5,), null_text=NullTextSettings(inner_steps=2))
    jobs = [
        (
            encode_png(xray_like(48, 40, seed=k), 16),
            ResolvedEdit(original_prompt=SOURCE, edit_prompt=EDIT, params=params),
        )
        for k in range(3)
    ]
    ended = []
    settings = Settings(redis_url=redis_server.url, blob_url=tmp_path.as_uri())
    report = measure_throughput(bundle, jobs, [3], settings, lambda: ended.append(1), baseline_jobs=2)
    assert [(r.pack, r.jobs) for r in report.rows] == [(1, 2), (3, 3)]
    assert len(ended) == 5  # the untimed warm-up job is not counted
    one, three = report.rows
    assert one.speedup == 1.0 and one.max_counterfactual_diff == 0.0
    assert three.same_candidate and three.max_counterfactual_diff < 1e-3 and three.max_s_clip_diff < 1e-3
    assert three.running_s > 0 and three.jobs_per_hour > 0
    assert report.steps == 3 and report.compile == "off"
    assert "| 3 | 3 |" in report.markdown()


def test_bad_pack_sizes_are_refused_naming_the_flag():
    run = subprocess.run(prism("bench-throughput", "--packs", "1,0"), capture_output=True, text=True)
    assert run.returncode == 2 and "--packs" in run.stderr and "above 0" in run.stderr
