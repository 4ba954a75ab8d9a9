"""The built-in model's card: the benchmark goals it records and marks."""

import json

from phantoms.model_card import GOALS, record_benchmark
from phantoms.recipe import STAGE_NAMES

_STAGE = {"steps": 10, "batch": 4, "lr": 1e-3}
_RECIPE = {
    "images": 40,
    "region_images": 40,
    "attention_weight": 0.02,
    **{name: _STAGE for name in STAGE_NAMES},
}


def _report(l1_remove: float, flip_add: float) -> dict:
    measures = {"identity_ratio": 1.02, "outside_change": 0.0031, "seconds": 20.0, "ssim_input": 0.9}
    return {
        "model": "abc123",
        "variants": {
            "default": {
                "tasks": {
                    "remove_devices": {"n": 30, "l1_ratio": l1_remove, "flip_rate": 0.95, **measures},
                    "add_devices": {"n": 30, "l1_ratio": 0.99, "flip_rate": flip_add, **measures},
                }
            }
        },
    }


def test_goals_use_the_add_devices_limit_and_the_direction_of_each_measure() -> None:
    l1, flip = GOALS[0], GOALS[1]
    assert (l1.met("remove_devices", 0.5), l1.met("remove_devices", 0.51)) == (True, False)
    assert (l1.met("add_devices", 1.0), l1.met("add_devices", 1.01)) == (True, False)
    assert (flip.met("add_devices", 0.9), flip.met("add_devices", 0.89)) == (True, False)


def test_record_benchmark_writes_the_goals_into_training_json_and_the_card(tmp_path) -> None:
    log = {"recipe": _RECIPE, "stages": {}, "measured": {}}
    (tmp_path / "training.json").write_text(json.dumps(log))
    record_benchmark(tmp_path, _report(l1_remove=0.54, flip_add=0.6))
    saved = json.loads((tmp_path / "training.json").read_text())["benchmark"]
    assert saved["tasks"]["remove_devices"] == {
        "n": 30,
        "l1_ratio": 0.54,
        "flip_rate": 0.95,
        "identity_ratio": 1.02,
        "outside_change": 0.0031,
    }
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert "| remove_devices | 30 | 0.54 (≤ 0.5: **not met**) | 0.95 (≥ 0.9: met) |" in card
    assert "| add_devices | 30 | 0.99 (≤ 1: met) | 0.6 (≥ 0.9: **not met**) |" in card


def test_the_card_states_the_local_blend_settings_the_model_carries(tmp_path) -> None:
    blend = {"side": 16, "dilation": 0, "threshold": 0.4, "word_thresholds": {"effusion": 0.6}}
    for recorded, line in (
        (
            blend,
            "| LocalBlend uses the 16×16 cross-attention maps without pooling, cut at 0.4; "
            "blend words with their own cut: 'effusion' 0.6 |",
        ),
        (None, "| `local_blend.json` | not recorded |"),
    ):
        log = {"recipe": _RECIPE, "stages": {}, "measured": {}, **({"local_blend": recorded} if recorded else {})}
        (tmp_path / "training.json").write_text(json.dumps(log))
        record_benchmark(tmp_path, _report(l1_remove=0.5, flip_add=0.9))
        assert line in (tmp_path / "MODEL_CARD.md").read_text()
