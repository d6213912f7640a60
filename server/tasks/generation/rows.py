"""The rows of the shared decoding batch and who holds them, apart from the buffers they index.

Row r of the batch belongs to one sequence: (owner, index), the index-th output of an owner (a
request). The rows in use are always [0, used): freeing a row moves the last row in use into the
hole, so a decode step runs over one contiguous range and a finished row costs nothing. The table
only keeps the books; moving a row's cache is the caller's, told by what `free` returns."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

Owner = TypeVar("Owner", bound=Hashable)


class RowTable(Generic[Owner]):
    """At most `capacity` rows, each held by (owner, index)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._holders: list[tuple[Owner, int]] = []  # row -> (owner, index)
        self._rows: dict[tuple[Owner, int], int] = {}  # (owner, index) -> row

    @property
    def used(self) -> int:
        return len(self._holders)

    def fits(self, count: int) -> bool:
        """Whether `count` more rows are free."""
        return self.used + count <= self.capacity

    def take(self, owner: Owner, count: int) -> range:
        """The next `count` free rows, for the owner's indices 0..count-1 in order."""
        if not self.fits(count):
            raise ValueError(f"{count} rows asked for, {self.capacity - self.used} free")
        first = self.used
        for index in range(count):
            self._rows[owner, index] = first + index
            self._holders.append((owner, index))
        return range(first, first + count)

    def holders(self) -> list[tuple[Owner, int]]:
        """(owner, index) of every row in use, in row order."""
        return list(self._holders)

    def row(self, owner: Owner, index: int) -> int:
        return self._rows[owner, index]

    def rows(self, owner: Owner, indices: Iterable[int]) -> list[int]:
        return [self._rows[owner, index] for index in indices]

    def free(self, row: int) -> int | None:
        """Frees `row`. Returns the row that moved into it (the last row in use), whose cache the
        caller must copy into `row`; None when `row` was the last one and nothing moved."""
        last = self.used - 1
        del self._rows[self._holders[row]]
        moved = self._holders.pop()
        if row == last:
            return None
        self._holders[row] = moved
        self._rows[moved] = row
        return last

    def free_owner(self, owner: Owner) -> list[tuple[int, int]]:
        """Frees every row of `owner`; returns the moves (source, target) to apply, in order."""
        moves = []
        for row in sorted((r for (o, _), r in self._rows.items() if o == owner), reverse=True):
            moved = self.free(row)
            if moved is not None:
                moves.append((moved, row))
        return moves

    def clear(self) -> None:
        self._holders.clear()
        self._rows.clear()
