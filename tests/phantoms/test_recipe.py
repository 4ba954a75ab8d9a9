"""The named training recipes."""

import pytest

from phantoms.recipe import RECIPES, STAGE_NAMES, TRAIN_SEEDS, Recipe


@pytest.mark.parametrize("name", list(RECIPES))
def test_scaled_recipe_keeps_a_floor_of_ten_steps_and_one_batch(name: str) -> None:
    quick = RECIPES[name].scaled(0.0001, batch=4)
    assert [(getattr(quick, s).steps, getattr(quick, s).batch) for s in STAGE_NAMES] == [(10, 4)] * len(STAGE_NAMES)
    assert [getattr(quick, s).lr for s in STAGE_NAMES] == [getattr(RECIPES[name], s).lr for s in STAGE_NAMES]


def test_recipe_cannot_ask_for_more_anatomies_than_there_are() -> None:
    with pytest.raises(ValueError, match="images must be 1 to 32000"):
        Recipe(images=len(TRAIN_SEEDS) + 1)
    assert Recipe(images=len(TRAIN_SEEDS)).images == 32000
