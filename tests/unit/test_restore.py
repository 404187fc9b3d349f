"""Restore rebuilds partition stores from the ``state`` changelog, every partition at once (real broker).

The synthetic states of :mod:`kflow.dev.failover` are written in transactions (so the changelog
holds commit markers, as an engine's does), restored into empty stores, and compared with what
the topic holds: every instance's latest state, its timer index entries, the changelog offset.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from kflow.config import KafkaConfig
from kflow.dev.failover import restore_into, synthetic_state, write_states
from kflow.schemas.codec import decode_state
from kflow.streams import metrics
from kflow.streams.restore import restore_partition, restore_partitions
from kflow.streams.store import EngineStore, timer_key


def latest_states(cfg: KafkaConfig) -> tuple[dict[int, dict[str, Any]], dict[int, int]]:
    """Latest internal state per instance per partition, and each partition's high watermark."""
    c = Consumer({**cfg.client_conf(), "group.id": uuid.uuid4().hex, "isolation.level": "read_committed",
                  "enable.partition.eof": True, "auto.offset.reset": "earliest"})
    states: dict[int, dict[str, Any]] = defaultdict(dict)
    highs = {}
    try:
        for p in range(cfg.partitions):
            highs[p] = c.get_watermark_offsets(TopicPartition(cfg.names.state, p), timeout=10, cached=False)[1]
        c.assign([TopicPartition(cfg.names.state, p, 0) for p in range(cfg.partitions) if highs[p]])
        left = {p for p in range(cfg.partitions) if highs[p]}
        while left:
            for m in c.consume(1000, 1.0):
                if m.error():
                    left.discard(m.partition())
                    continue
                rec = decode_state(m.value())
                states[m.partition()][rec["instance_id"]] = rec["internal"]
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
        first = restore_partitions(cfg.consumer_conf("kflow-restore"), cfg.names.state, stores)
        assert sum(s.records for s in first.values()) == 300
        write_states(cfg, 30, tag="a", timers=False)  # new versions of 30 instances, their timers gone
        write_states(cfg, 50, tag="b")
        again = restore_partitions(cfg.consumer_conf("kflow-restore"), cfg.names.state, stores)
        assert sum(s.records for s in again.values()) == 80  # only the tail past the stored offsets
        assert all(s.start_offset == first[p].end_offset for p, s in again.items())
        assert assert_store_matches_topic(store, cfg) == 350
        p0 = store.get(0)
        assert restore_partition(cfg.consumer_conf("kflow-restore"), cfg.names.state, p0).records == 0
    finally:
        store.close_all()


def test_synthetic_states_have_timers_every_third_instance():
    assert synthetic_state("x", 3, 1000)["timers"] and not synthetic_state("y", 4, 1000)["timers"]
