"""The shared batch's row bookkeeping (RowTable), without ONNX: rows in use stay [0, used), a freed
row takes the last row in use, and every (owner, index) always finds its row."""

from __future__ import annotations

import random

import pytest
from onnxserve.server.tasks.generation.rows import RowTable


def check_consistent(table: RowTable, cache: list[tuple[str, int]]) -> None:
    """The table's books agree with a model of the cache that applied every move it was told."""
    assert table.holders() == cache
    for row, (owner, index) in enumerate(cache):
        assert table.row(owner, index) == row


def test_freeing_moves_the_last_row_into_the_hole():
    table: RowTable[str] = RowTable(4)
    assert list(table.take("a", 2)) == [0, 1] and list(table.take("b", 2)) == [2, 3]
    assert not table.fits(1)
    assert table.free(1) == 3  # b's second row moves into a's second
    assert table.holders() == [("a", 0), ("b", 1), ("b", 0)]
    assert table.row("b", 1) == 1 and table.rows("b", [0, 1]) == [2, 1]
    assert table.free(2) is None  # the last row: nothing moves
    assert table.used == 2 and table.fits(2)


def test_taking_more_rows_than_are_free_is_refused():
    table: RowTable[str] = RowTable(2)
    table.take("a", 1)
    with pytest.raises(ValueError, match="2 rows asked for, 1 free"):
        table.take("b", 2)
    assert table.holders() == [("a", 0)]


def test_free_owner_reports_the_moves_of_its_rows():
    table: RowTable[str] = RowTable(6)
    table.take("a", 2)
    table.take("b", 3)
    table.take("c", 1)
    cache = table.holders()
    for source, target in table.free_owner("a"):
        cache[target] = cache[source]
    del cache[table.used :]
    check_consistent(table, cache)
    assert {owner for owner, _ in table.holders()} == {"b", "c"}


def test_random_joins_and_leaves_keep_the_books_and_the_cache_in_step():
    """Owners join and leave at random; a list standing for the KV cache applies each reported
    move, and must always hold, at each row, the sequence the table says is there."""
    rng = random.Random(0)
    table: RowTable[int] = RowTable(16)
    cache: list[tuple[int, int]] = []
    live: set[int] = set()
    for owner in range(300):
        count = rng.randint(1, 4)
        if table.fits(count):
            first = table.used
            assert list(table.take(owner, count)) == list(range(first, first + count))
            cache.extend((owner, index) for index in range(count))
            live.add(owner)
        for _ in range(rng.randint(0, 3)):
            if not cache:
                break
            row = rng.randrange(len(cache))
            moved = table.free(row)
            if moved is not None:
                cache[row] = cache[moved]
            cache.pop()
        if live and rng.random() < 0.3:
            leaving = rng.choice(sorted(live))
            live.discard(leaving)
            for source, target in table.free_owner(leaving):
                cache[target] = cache[source]
            del cache[table.used :]
        check_consistent(table, cache)
    table.clear()
    assert table.used == 0 and table.holders() == []
