import numpy as np

from phantoms.captions import explicit_caption, prism_caption, training_caption
from phantoms.render import FINDINGS, Anatomy, Findings, region_mask, render


def test_rendering_is_deterministic_and_toggles_only_inside_the_region():
    anatomy = Anatomy.sample(123)
    base = Findings(pleural_effusion=True)
    a, b = render(anatomy, base), render(Anatomy.sample(123), base)
    assert np.array_equal(a, b) and a.shape == (128, 128) and 0 <= a.min() and a.max() <= 1
    for finding in FINDINGS:
        toggled = render(anatomy, base.toggled(finding))
        mask = region_mask(anatomy, finding)
        changed = np.abs(toggled - a) > 1e-6
        assert changed.any(), finding
        assert not (changed & ~mask).any(), finding
        assert 0.002 < mask.mean() < 0.6, finding


def test_other_anatomies_differ():
    assert np.abs(render(Anatomy.sample(1), Findings()) - render(Anatomy.sample(2), Findings())).mean() > 0.01


def test_captions_follow_the_prism_template():
    assert prism_caption(Findings()) == "Normal chest X-ray with no significant findings"
    assert prism_caption(Findings(True, False, True)) == "Chest X-ray showing Cardiomegaly, Support Devices"
    with_devices = explicit_caption(Findings(support_devices=True))
    without = explicit_caption(Findings())
    assert len(with_devices.split()) == len(without.split())
    assert [w for w, v in zip(with_devices.split(), without.split(), strict=True) if w != v] == ["with"]
    rng = np.random.default_rng(0)
    assert len({training_caption(Findings(pleural_effusion=True), rng) for _ in range(50)}) >= 4
