"""Standby hand-over bookkeeping without a broker: which stores the tailer holds, what it may write.

Real RocksDB stores under ``tmp_path`` and real ``confluent_kafka.Message`` records carrying
encoded ``state`` records; only the consumer is left out (the tailer thread drives it from
:meth:`StandbySet.plan`, :meth:`StandbySet.apply` and :meth:`StandbySet.advance`).
"""

from __future__ import annotations

import os
import threading
from collections import Counter

from confluent_kafka import Message, TopicPartition

from kflow.dev.failover import synthetic_state
from kflow.schemas.codec import encode_engine_state
from kflow.streams.restore import apply_state_records
from kflow.streams.standby import Changelog, StandbySet, changelogs, standby_choice
from kflow.streams.store import StorePartition, journal_key
from kflow.streams.topics import TopicNames

NAMES = TopicNames("sb.")
STATE = NAMES.engine_state


def record(p: int, offset: int, iid: str, x: int = 0) -> Message:
    """One ``state`` changelog record of instance ``iid`` at ``offset`` of partition ``p``."""
    st = synthetic_state(iid, x, 1_000, timers=False)
    return Message(topic=STATE, partition=p, offset=offset, key=iid.encode(), value=encode_engine_state(iid, st))


def make_set(tmp_path, partitions: int = 4, changelog_list=None) -> StandbySet:
    def open_store(p: int) -> StorePartition:
        return StorePartition(os.path.join(tmp_path, str(p)), p, 100)

    # the state changelog alone unless a test says otherwise: the journal is tailed the same way
    return StandbySet(changelog_list or [changelogs(NAMES)[0]], partitions, open_store)


def test_two_engines_keep_every_partition_the_other_owns_warm():
    owners = {0: "a", 1: "a", 2: "b", 3: "b"}
    assert standby_choice("a", ["a", "b"], owners, 4, 1) == {2, 3}
    assert standby_choice("b", ["b", "a"], owners, 4, 1) == {0, 1}
    # N+1 members or fewer: still every partition not owned
    assert standby_choice("c", ["a", "b", "c"], owners, 4, 2) == {0, 1, 2, 3}


def test_more_members_than_replicas_spread_n_copies_per_partition_never_on_the_owner():
    members = ["m1", "m2", "m3", "m4", "m5"]
    owners = {p: members[p % 5] for p in range(20)}
    for n in (1, 2):
        chosen = {m: standby_choice(m, members, owners, 20, n) for m in members}
        holders = Counter(p for parts in chosen.values() for p in parts)
        assert all(holders[p] == n for p in range(20)), holders
        assert all(p not in chosen[owners[p]] for p in range(20))
        per_member = [len(parts) for parts in chosen.values()]
        assert max(per_member) - min(per_member) <= 2, per_member


def test_plan_opens_chosen_stores_not_owned_and_assigns_them_at_their_stored_offset(tmp_path):
    s = make_set(tmp_path)
    s.release([0])  # owned by this engine before the tailer opened anything
    unassign, assign = s.plan()
    assert unassign == [] and [(tp.partition, tp.offset) for tp in assign] == [(1, 0), (2, 0), (3, 0)]
    assert sorted(s.held) == [1, 2, 3] and s.assigned == {1, 2, 3}
    assert s.apply([record(1, 0, "i1"), record(1, 1, "i2", 5), record(2, 0, "i3")]) == 3
    assert s.held[1].changelog_offset() == 2 and s.held[1].get("i2")["vars"] == {"x": 5}
    s.choose({2, 3})
    unassign, assign = s.plan()
    assert [tp.partition for tp in unassign] == [1] and assign == [] and sorted(s.held) == [2, 3]
    s.close_all()


def test_records_below_the_stored_offset_are_not_applied_again(tmp_path):
    s = make_set(tmp_path, 1)
    s.plan()
    s.apply([record(0, 0, "i1", 1), record(0, 1, "i1", 2)])
    assert s.apply([record(0, 0, "i1", 1)]) == 0
    assert s.held[0].get("i1")["vars"] == {"x": 2} and s.held[0].changelog_offset() == 2
    s.close_all()


def test_a_released_partition_is_never_written_again_and_comes_back_from_its_stored_offset(tmp_path):
    s = make_set(tmp_path, 2)
    s.plan()
    s.apply([record(1, 0, "i1", 1)])
    got = s.release([1])
    sp = got[1]
    assert 1 not in s.held and s.owned == {1}
    # records of the old assignment still fetched: dropped
    assert s.apply([record(1, 1, "i1", 99)]) == 0 and sp.get("i1")["vars"] == {"x": 1}
    s.advance([TopicPartition(STATE, 1, 7)])
    assert sp.changelog_offset() == 1
    # the processor owns it now and writes past what the standby had
    apply_state_records(sp, [record(1, 1, "i1", 2), record(1, 2, "i4", 3)])
    # revoked before the tailer's next round: still assigned on its consumer, so stale
    s.take_back([sp])
    assert s.apply([record(1, 3, "i1", 50)]) == 0, "an assignment from before the hand-over applied a record"
    unassign, assign = s.plan()
    assert [tp.partition for tp in unassign] == [1]
    assert [(tp.partition, tp.offset) for tp in assign] == [(1, 3)]
    assert s.apply([record(1, 3, "i1", 4)]) == 1 and s.held[1] is sp and sp.get("i1")["vars"] == {"x": 4}
    s.close_all()


def test_release_waits_for_the_write_in_flight(tmp_path):
    entered, go = threading.Event(), threading.Event()

    def slow_apply(store: StorePartition, msgs: list[Message]) -> None:
        entered.set()
        assert go.wait(10)
        apply_state_records(store, msgs)

    slow = Changelog(STATE, slow_apply, StorePartition.changelog_offset, lambda sp, off: sp.write({}, {}, off))
    s = make_set(tmp_path, 1, [slow])
    s.plan()
    writer = threading.Thread(target=s.apply, args=([record(0, 0, "i1")],))
    writer.start()
    assert entered.wait(10)
    released: dict[int, StorePartition] = {}
    releaser = threading.Thread(target=lambda: released.update(s.release([0])))
    releaser.start()
    releaser.join(0.2)
    assert releaser.is_alive(), "release returned while the tailer was writing the store"
    go.set()
    writer.join(10)
    releaser.join(10)
    assert released[0].changelog_offset() == 1  # the write finished before the hand-over
    released[0].close()


def test_advance_records_positions_past_commit_markers(tmp_path):
    s = make_set(tmp_path, 1)
    s.plan()
    s.apply([record(0, 0, "i1")])
    s.advance([TopicPartition(STATE, 0, 2)])  # offset 1 was the transaction's commit marker
    assert s.held[0].changelog_offset() == 2
    s.advance([TopicPartition(STATE, 0, -1001)])  # no position yet: nothing recorded
    assert s.held[0].changelog_offset() == 2
    assert s.stored_offsets() == {(STATE, 0): 2}
    s.close_all()


def test_a_partition_not_chosen_any_more_is_closed_when_taken_back(tmp_path):
    s = make_set(tmp_path, 2)
    s.release([0])
    s.plan()
    s.choose({1})
    sp = StorePartition(os.path.join(tmp_path, "0"), 0, 10)
    s.take_back([sp])
    assert 0 not in s.held and s.owned == set()
    StorePartition(os.path.join(tmp_path, "0"), 0, 10).close()  # closed: the directory opens again
    s.close_all()


def test_the_journal_changelog_is_tailed_beside_the_state(tmp_path):
    state, journal = changelogs(NAMES)
    assert (state.topic, journal.topic) == (NAMES.engine_state, NAMES.journal)
    s = make_set(tmp_path, 1, [state, journal])
    _, assign = s.plan()
    assert sorted((tp.topic, tp.offset) for tp in assign) == [(NAMES.engine_state, 0), (NAMES.journal, 0)]
    key = journal_key("i1", 1, "i", 0)
    entry = Message(topic=NAMES.journal, partition=0, offset=0, key=key, value=b'["WorkflowStarted",{},1,1]')
    assert s.apply([record(0, 0, "i1"), entry]) == 2
    assert s.held[0].journal_offset() == 1 and s.held[0].changelog_offset() == 1
    assert s.held[0].read_journal("i1", 1)[0] == [["WorkflowStarted", {}, 1, 1]]
    assert s.stored_offsets() == {(NAMES.engine_state, 0): 1, (NAMES.journal, 0): 1}
    s.close_all()
