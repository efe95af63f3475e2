"""JournaledDict: readers find the keys changed since their mark, each once,
and learn when the notes they need are gone."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from overlayd.journaled import JournaledDict


def test_changed_since_gives_each_written_or_deleted_key_once_in_order() -> None:
    values = JournaledDict({"a": b"1"})
    mark = values.mark
    values["b"] = b"2"
    values["a"] = b"3"
    values["b"] = b"4"
    del values["a"]
    assert values.pop("c", None) is None  # absent: nothing to note
    assert values.pop("b") == b"4"
    assert values.changed_since(mark) == ["b", "a"]
    assert values.changed_since(values.mark) == []
    assert dict(values) == {}


def test_a_reader_whose_notes_were_dropped_is_told_to_compare_everything() -> None:
    class Small(JournaledDict):
        slack = 4

    values = Small()
    mark = values.mark
    for n in range(20):
        values[f"k{n % 2}"] = str(n).encode()
    assert values.changed_since(mark) is None
    recent = values.mark
    values["k0"] = b"x"
    assert values.changed_since(recent) == ["k0"]
    assert values.changed_since(values.mark + 1) is None  # a mark from elsewhere


REFUSED: dict[str, Callable[[JournaledDict], object]] = {
    "update": lambda values: values.update({"b": b"2"}),
    "setdefault": lambda values: values.setdefault("b", b"2"),
    "popitem": lambda values: values.popitem(),
    "clear": lambda values: values.clear(),
    "|=": lambda values: values.__ior__({"b": b"2"}),
}


@pytest.mark.parametrize("mutator", sorted(REFUSED))
def test_bulk_writes_that_would_skip_the_notes_are_refused(mutator: str) -> None:
    values = JournaledDict({"a": b"1"})
    with pytest.raises(TypeError, match="one by one"):
        REFUSED[mutator](values)
    assert dict(values) == {"a": b"1"}
