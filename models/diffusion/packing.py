"""Several counterfactuals in one pack: which items are still in a packed loop, and their progress.

A worker that packs jobs runs their inversions, null-text optimisations and edits as one pack
(row ``r`` of every tensor is item ``alive[r]``). Each item keeps its own progress callback; a
callback that raises :class:`LeavePack` (a canceled job) takes its item out at that step, and
the loop drops its rows while the others go on. An item whose own input the engine finds
unusable leaves the same way (:meth:`PackProgress.fail`). Any other exception stops the whole
pack.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

ProgressCallback = Callable[[str, int, int], None]


class LeavePack(Exception):
    """Raised by an item's progress callback to leave a packed run; the other items go on."""


class PackProgress:
    """The items of a packed run, in the order of their rows, and the progress callback of each.

    ``left`` maps an item that left to why (the :class:`LeavePack` it raised, or its own error);
    it is shared with every :meth:`subset`, so that an item leaving a phase run by some of the
    items (the inversion of those the cache did not have) leaves the whole run.
    """

    def __init__(
        self,
        callbacks: Sequence[ProgressCallback | None],
        items: Sequence[int] | None = None,
        left: dict[int, Exception] | None = None,
    ) -> None:
        self.callbacks = list(callbacks)
        self.items = list(range(len(self.callbacks))) if items is None else list(items)
        self.left = {} if left is None else left

    @classmethod
    def single(cls, callback: ProgressCallback | None) -> PackProgress:
        """A run of one item (the methods that do not pack)."""
        return cls([callback])

    @property
    def alive(self) -> list[int]:
        """The items still running, in row order."""
        return [i for i in self.items if i not in self.left]

    def subset(self, items: Sequence[int]) -> PackProgress:
        """Some of the items, sharing who has left."""
        return PackProgress(self.callbacks, items, self.left)

    def fail(self, item: int, error: Exception) -> None:
        """Take ``item`` out of the run for a reason of its own (its words, its mask)."""
        self.left[item] = error

    def report(self, phase: str, step: int, total: int) -> list[int] | None:
        """Tell every item still running where the pack is. Returns the rows (of the items running
        before the call) that stay when some left, None when all stay."""
        alive = self.alive
        stay = []
        for row, item in enumerate(alive):
            callback = self.callbacks[item]
            try:
                if callback is not None:
                    callback(phase, step, total)
                stay.append(row)
            except LeavePack as exc:
                self.left[item] = exc
        return None if len(stay) == len(alive) else stay
