"""Restore rebuilds partition stores from the ``state`` and ``journal`` changelogs, every partition at once
(real broker).

The synthetic states of :mod:`kflow.dev.failover` are written in transactions (so the changelog
holds commit markers, as an engine's does), restored into empty stores, and compared with what
the topic holds: every instance's latest state, its timer index entries, the changelog offset.
Code workflows decided with a journal are written to both changelogs and to a store the way a
lane writes them, and a store restored from the changelogs must equal that store.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from typing import Any

import orjson
from confluent_kafka import Consumer, Message, Producer, TopicPartition

from kflow.config import KafkaConfig
from kflow.dev.failover import restore_into, synthetic_state, write_states
from kflow.engine.core import Decision
from kflow.schemas.codec import decode_engine_state, encode_engine_state
from kflow.streams import metrics
from kflow.streams.partitioner import partition_for
from kflow.streams.restore import end_offsets, restore_partition, restore_partitions
from kflow.streams.store import EngineStore, StorePartition, journal_records, timer_key
from kflow.streams.topics import ensure_topics
from tests.unit.engine.test_journal import Driver, complete, start


def latest_states(cfg: KafkaConfig) -> tuple[dict[int, dict[str, Any]], dict[int, int]]:
    """Latest internal state per instance per partition, and each partition's high watermark."""
    c = Consumer({**cfg.client_conf(), "group.id": uuid.uuid4().hex, "isolation.level": "read_committed",
                  "enable.partition.eof": True, "auto.offset.reset": "earliest"})
    states: dict[int, dict[str, Any]] = defaultdict(dict)
    highs = {}
    try:
        for p in range(cfg.partitions):
            highs[p] = c.get_watermark_offsets(TopicPartition(cfg.names.engine_state, p), timeout=10, cached=False)[1]
        c.assign([TopicPartition(cfg.names.engine_state, p, 0) for p in range(cfg.partitions) if highs[p]])
        left = {p for p in range(cfg.partitions) if highs[p]}
        while left:
            for m in c.consume(1000, 1.0):
                if m.error():
                    left.discard(m.partition())
                    continue
                iid, internal = decode_engine_state(m.value())
                states[m.partition()][iid] = internal
    finally:
        c.close()
    return states, highs


def assert_store_matches_topic(store: EngineStore, cfg: KafkaConfig) -> int:
    """Every partition store holds exactly the topic's latest states, their timers and its end offset."""
    expected, highs = latest_states(cfg)
    total = 0
    for p in range(cfg.partitions):
        sp = store.get(p)
        got = dict(sp.iter_states())
        assert got == expected.get(p, {}), f"partition {p}: store differs from the changelog"
        assert sp.changelog_offset() == highs[p], f"partition {p}: offset {sp.changelog_offset()} != {highs[p]}"
        want_timers = {timer_key(t["due"], iid, tid) for iid, st in got.items() for tid, t in st["timers"].items()}
        have_timers = {k for k in sp.db.keys(from_key=b"t:") if k.startswith(b"t:")}
        assert have_timers == want_timers, f"partition {p}: timer index differs"
        total += len(got)
    return total


def test_all_partitions_restore_together_into_the_changelog_contents(kafka_bootstrap, topic_prefix, tmp_path):
    cfg = KafkaConfig(bootstrap=kafka_bootstrap, topic_prefix=topic_prefix, partitions=16)
    write_states(cfg, 3000, chunk=700)
    before = metrics.RESTORE_RECORDS._value.get()
    records, _seconds, store = restore_into(cfg, str(tmp_path / "s"))
    try:
        assert records == 3000
        assert metrics.RESTORE_RECORDS._value.get() - before == 3000
        assert metrics.RESTORE_PENDING._value.get() == 0
        assert assert_store_matches_topic(store, cfg) == 3000
        # the next due timer comes from one seek of the index
        nexts = [store.get(p).next_due() for p in range(16)]
        assert all(n is not None for n in nexts)
    finally:
        store.close_all()


def test_restore_continues_from_the_stored_offset_and_drops_superseded_timers(kafka_bootstrap, topic_prefix,
                                                                                tmp_path):
    cfg = KafkaConfig(bootstrap=kafka_bootstrap, topic_prefix=topic_prefix, partitions=4)
    write_states(cfg, 300, tag="a")
    store = EngineStore(str(tmp_path / "s"), 0)
    try:
        stores = [store.open(p, 0) for p in range(4)]
        first = restore_partitions(cfg.consumer_conf("kflow-restore"), cfg.names.engine_state, stores)
        assert sum(s.records for s in first.values()) == 300
        write_states(cfg, 30, tag="a", timers=False)  # new versions of 30 instances, their timers gone
        write_states(cfg, 50, tag="b")
        again = restore_partitions(cfg.consumer_conf("kflow-restore"), cfg.names.engine_state, stores)
        assert sum(s.records for s in again.values()) == 80  # only the tail past the stored offsets
        assert all(s.start_offset == first[p].end_offset for p, s in again.items())
        assert assert_store_matches_topic(store, cfg) == 350
        p0 = store.get(0)
        assert restore_partition(cfg.consumer_conf("kflow-restore"), cfg.names.engine_state, p0).records == 0
    finally:
        store.close_all()


def test_synthetic_states_have_timers_every_third_instance():
    assert synthetic_state("x", 3, 1000)["timers"] and not synthetic_state("y", 4, 1000)["timers"]


# -- the journal changelog ------------------------------------------------------------------------
class ChangelogWriter:
    """Writes decisions as a lane does: one transaction per batch with the state record of each
    changed instance and the journal records of every decision, then the store, with the offsets."""

    def __init__(self, cfg: KafkaConfig, store: EngineStore) -> None:
        self.cfg, self.store = cfg, store
        tid = f"{cfg.topic_prefix}lane-{uuid.uuid4().hex[:6]}"
        self.producer = Producer(cfg.producer_conf(**{"transactional.id": tid}))
        self.producer.init_transactions(30)

    def commit(self, run: Driver, decisions: list[Decision]) -> None:
        names, parts = self.cfg.names, self.cfg.partitions
        nexts: dict[tuple[str, int], int] = {}

        def delivered(err: Any, msg: Message) -> None:
            assert err is None, err
            key = (msg.topic(), msg.partition())
            nexts[key] = max(nexts.get(key, 0), msg.offset() + 1)

        states: dict[int, dict[str, Any]] = defaultdict(dict)
        records: dict[int, list[tuple[bytes, Any]]] = defaultdict(list)
        for d in decisions:
            assert d.state is not None
            p = partition_for(d.state["id"], parts)
            states[p][d.state["id"]] = d.state
            records[p] += journal_records(d.journal)
        self.producer.begin_transaction()
        for p, by_id in states.items():
            for iid, st in by_id.items():
                self.producer.produce(names.engine_state, encode_engine_state(iid, st), iid.encode(), partition=p,
                                      on_delivery=delivered)
            for key, value in records[p]:
                self.producer.produce(names.journal, value, key, partition=p, on_delivery=delivered)
        self.producer.commit_transaction(30)
        for p, by_id in states.items():
            sp = self.store.get(p)
            old = {iid: sp.get(iid) for iid in by_id}
            sp.write(by_id, old, nexts.get((names.engine_state, p)), (), records[p], nexts.get((names.journal, p)))


def _data(sp: StorePartition) -> dict[bytes, Any]:
    """A store's states, timer index and journal (its changelog offsets are checked separately)."""
    return {k: orjson.loads(v) if v else v for k, v in sp.db.items() if k[:2] in (b"s:", b"t:", b"j:")}


def test_state_and_journal_changelogs_restore_the_store_they_were_written_with(kafka_bootstrap, topic_prefix,
                                                                                 tmp_path):
    cfg = KafkaConfig(bootstrap=kafka_bootstrap, topic_prefix=topic_prefix, partitions=4)
    ensure_topics(cfg.client_conf(), cfg.names, cfg.topic_settings)
    written = EngineStore(str(tmp_path / "written"), 0)
    restored = EngineStore(str(tmp_path / "restored"), 0)
    try:
        for p in range(4):
            written.open(p, 0)
        stores = [restored.open(p, 0) for p in range(4)]
        out = ChangelogWriter(cfg, written)
        run = Driver()
        # twelve code workflows: half close after three steps (their journal is tombstoned), half run on;
        # two chains continue as new twice (the journal of their first two runs is tombstoned)
        pending = {f"w{i}": run.step(start(f"w{i}", "j.loop", 3 if i % 2 else 50)) for i in range(12)}
        pending |= {f"c{i}": run.step(start(f"c{i}", "j.chain", {"n": 0, "until": 100})) for i in range(2)}
        out.commit(run, list(pending.values()))
        for round_ in range(5):
            batch = []
            for iid, d in list(pending.items()):
                if run.states[iid]["status"] == "RUNNING":
                    pending[iid] = d = run.step(complete(d, round_ + 1))
                    batch.append(d)
            out.commit(run, batch)
            if round_ == 1:  # restore half way; the second restore continues from the stored offsets
                first = restore_partitions(cfg.consumer_conf("kflow-restore"), cfg.names.engine_state, stores)
                assert sum(s.journal_records for s in first.values()) > 0
        again = restore_partitions(cfg.consumer_conf("kflow-restore"), cfg.names.engine_state, stores)
        assert all(s.start_offset == first[p].end_offset for p, s in again.items())
        closed = [iid for iid, st in run.states.items() if st["status"] == "COMPLETED"]
        assert len(closed) == 6 and all(run.states[f"c{i}"]["run"] == 3 for i in range(2))
        state_marks = end_offsets(cfg.client_conf(), cfg.names.engine_state, list(range(4)))
        journal_marks = end_offsets(cfg.client_conf(), cfg.names.journal, list(range(4)))
        for p in range(4):
            expected = _data(written.get(p))
            assert _data(restored.get(p)) == expected, f"partition {p}: restored store differs"
            assert restored.get(p).changelog_offset() == state_marks[p][1]
            assert restored.get(p).journal_offset() == journal_marks[p][1]
        for iid, st in run.states.items():
            sp, number = restored.get(partition_for(iid, 4)), st.get("run", 1)
            assert all(sp.read_journal(iid, r) == ([], []) for r in range(1, number))  # runs that continued
            inputs, commands = sp.read_journal(iid, number)
            if st["status"] == "COMPLETED":
                assert (inputs, commands) == ([], [])
            else:
                assert (inputs, commands) == run.journal.read(iid, number)
                assert len(inputs) == st["input_count"] > 0
    finally:
        written.close_all()
        restored.close_all()
