"""What every service does once started: its start-up heap leaves the garbage collector's walk."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from services.common.lifecycle import freeze_startup_heap


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def frozen_heap() -> Iterator[None]:
    """Let the test freeze this process's heap, and give it back to the collector afterwards."""
    gc.unfreeze()
    try:
        yield
    finally:
        gc.unfreeze()


def test_objects_alive_at_start_are_left_out_of_later_collections(frozen_heap: None) -> None:
    startup = [[i] for i in range(1000)]
    frozen = freeze_startup_heap()
    after = [[i] for i in range(10)]
    tracked = {id(o) for o in gc.get_objects()}
    assert frozen >= len(startup)
    assert not any(id(o) in tracked for o in startup)
    assert all(id(o) in tracked for o in after)


def test_garbage_left_by_start_up_is_freed_not_frozen(frozen_heap: None) -> None:
    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: only the collector frees it
    gone = weakref.ref(a)
    del a, b
    freeze_startup_heap()
    assert gone() is None
