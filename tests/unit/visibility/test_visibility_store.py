"""The visibility store on its own (SQLite): ordering guards, tombstones, offsets, bad filters."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from kflow.model.messages import Event
from kflow.visibility.store import FilterError, InstanceFilter, Record, VisibilityStore, search_text


def _state(seq: int, status: str = "RUNNING", **search: Any) -> dict[str, Any]:
    return {"instance_id": "i1", "workflow": "w", "version": 1, "status": status, "seq": seq, "started_ms": 10,
            "updated_ms": 10 + seq, "closed_ms": None, "result": None, "error_type": None, "error_message": None,
            "internal": {"search": search, "threads": {}}}


@pytest.fixture
def store(tmp_path: Any) -> Iterator[VisibilityStore]:
    s = VisibilityStore(f"sqlite:///{tmp_path / 'v.db'}")
    yield s
    s.close()


def test_state_rows_only_move_forward_and_offsets_go_with_them(store):
    assert store.apply([Record("state", "i1", _state(3, customer="acme"))], {("s", 0): 5}) == {"i1"}
    # an older record (a redelivery, or out of order) changes nothing but the offsets
    assert store.apply([Record("state", "i1", _state(2, customer="old"))], {("s", 0): 6}) == set()
    row = store.get_instance("i1")
    assert row["seq"] == 3 and row["search"] == {"customer": "acme"}
    assert store.offsets() == {("s", 0): 6}
    store.apply([Record("state", "i1", _state(4, "COMPLETED", customer="globex"))], {("s", 0): 7})
    assert store.list_instances(InstanceFilter(search=[("customer", "acme")])).items == []
    found = store.list_instances(InstanceFilter(search=[("customer", "globex")])).items
    assert [r["instance_id"] for r in found] == ["i1"]


def test_events_are_keyed_and_a_tombstone_removes_the_instance(store):
    ev = Event("WorkflowStarted", "i1", 1, 10, {"workflow": "w"})
    assert store.apply([Record("event", "i1", ev)], {}) == {"i1"}
    assert store.apply([Record("event", "i1", ev)], {}) == set()  # the same (instance, seq) again
    assert [e["seq"] for e in store.history("i1")] == [1]
    store.apply([Record("state", "i1", _state(1, tier=1))], {})
    assert store.apply([Record("state", "i1", None)], {}) == {"i1"}
    assert store.get_instance("i1") is None and store.list_instances(InstanceFilter(search=[("tier", "1")])).items == []


def test_bad_filters_are_named():
    with pytest.raises(FilterError, match="unknown status NOPE"):
        InstanceFilter(status=["NOPE"])


def test_bad_cursor_and_limit_are_errors(store):
    with pytest.raises(FilterError, match="cursor 'x' is not valid"):
        store.list_instances(InstanceFilter(), 10, "x")
    with pytest.raises(FilterError, match="limit must be between 1 and 1000"):
        store.list_instances(InstanceFilter(), 0)


def test_search_text_normalises_numbers():
    assert search_text(5) == search_text(5.0) == "5"
    assert search_text(True) == "true" and search_text("acme") == "acme" and search_text([1, 2]) == "[1,2]"
