"""Writes aside then renamed: the path holds the old whole or the new whole."""

import numpy as np
import pytest

from models.atomic import write_aside


def test_a_file_is_replaced_whole_and_keeps_its_suffix(tmp_path):
    path = tmp_path / "data.npz"
    write_aside(path, lambda aside: np.savez(aside, x=np.arange(3)))
    write_aside(path, lambda aside: np.savez(aside, x=np.arange(5)))
    assert np.load(path)["x"].tolist() == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npz"]


def test_a_failed_write_leaves_the_previous_whole_and_the_next_write_clears_its_leftover(tmp_path):
    path = tmp_path / "checkpoint"

    def write(step: int, fail: bool = False):
        def into(aside):
            aside.mkdir()
            (aside / "step").write_text(str(step))
            if fail:
                raise OSError("disk full")

        return into

    write_aside(path, write(1))
    with pytest.raises(OSError, match="disk full"):
        write_aside(path, write(2, fail=True))
    assert (path / "step").read_text() == "1"
    write_aside(path, write(3))
    assert (path / "step").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
