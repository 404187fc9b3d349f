"""Upgrading a deployment of the release that kept the engine's state in ``state`` records
(``internal``) to the ``engine-state`` changelog, against a real broker: an engine refuses to start
before the upgrade, ``kflow upgrade engine-state`` copies what is missing (once), and an engine with
an empty state dir then restores the instances that were open before and finishes them."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from typer.testing import CliRunner

from kflow.cli import app
from kflow.config import EngineConfig
from kflow.schemas.codec import decode_engine_state, encode_engine_state, encode_state
from kflow.streams.partitioner import partition_for
from kflow.streams.processor import EngineProcessor
from kflow.streams.restore import UpgradeRequired
from kflow.streams.topics import ensure_topics
from kflow.testing.harness import EngineHarness
from tests.integration.conftest import PARTITIONS, Stack
from tests.legacy_state import encode_legacy_state

WAIT = {"name": "upgrade.wait", "version": 1, "steps": [
    {"id": "w", "wait": {"signal": "go"}, "output": "got"},
    {"id": "done", "succeed": "{'input': input, 'got': got}"}]}


def legacy_states(n: int) -> dict[str, dict[str, Any]]:
    """``n`` open instances of WAIT as the earlier release's engine left them (waiting for 'go')."""
    h = EngineHarness()
    h.deploy(WAIT)
    for i in range(n):
        h.start("upgrade.wait", f"old-{i}", {"i": i})
    return h.states


def produce(bootstrap: str, records: list[tuple[str, str, bytes]]) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random"})
    for topic, key, value in records:
        p.produce(topic, value, key.encode(), partition=partition_for(key, PARTITIONS))
    assert p.flush(30) == 0


def upgrade(stack: Stack, *extra: str) -> str:
    res = CliRunner().invoke(app, ["upgrade", "engine-state", *extra, "--bootstrap", stack.bootstrap,
                                   "--prefix", stack.prefix])
    assert res.exit_code == 0, res.output
    return res.output


def engine_state_topic(stack: Stack) -> dict[str, dict[str, Any]]:
    from kflow.streams.restore import _read_to_end  # the same committed read the command makes

    out: dict[str, dict[str, Any]] = {}
    conf = stack.kafka_config(EngineConfig).consumer_conf("t")
    _read_to_end(conf, f"{stack.prefix}engine-state", list(range(PARTITIONS)),
                 lambda msgs: out.update(decode_engine_state(m.value()) for m in msgs))
    return out


def test_upgrade_copies_open_instances_once_and_an_empty_engine_restores_them(kafka_bootstrap: str,
                                                                               tmp_path: Path) -> None:
    stack = Stack(kafka_bootstrap, f"u{uuid.uuid4().hex[:8]}.", str(tmp_path))
    try:
        cfg = stack.kafka_config(EngineConfig)
        ensure_topics(cfg.client_conf(), cfg.names, cfg.topic_settings, queues=["default"])
        stack.client.deploy(WAIT)
        old = legacy_states(6)
        produce(kafka_bootstrap, [(cfg.names.state, iid, encode_legacy_state(st)) for iid, st in old.items()])

        # 1. an engine of this release refuses to start on it
        proc = EngineProcessor(stack.kafka_config(EngineConfig, state_dir=str(tmp_path / "refused")))
        with pytest.raises(UpgradeRequired, match="kflow upgrade engine-state") as refused:
            proc.run()
        assert refused.value.instance_id in old

        # an instance an engine already wrote newer state of, and a record without internal
        newer = {**old["old-0"], "vars": {"note": "written by this release"}}
        current = encode_state({"instance_id": "new-1", "workflow": "w", "version": 1, "status": "RUNNING",
                                "seq": 1, "started_ms": 1, "updated_ms": 1})
        produce(kafka_bootstrap, [(cfg.names.engine_state, "old-0", encode_engine_state("old-0", newer)),
                                  (cfg.names.engine_state, "new-1", encode_engine_state("new-1", {"id": "new-1"})),
                                  (cfg.names.state, "new-1", current)])

        # 2. the dry run writes nothing; the upgrade copies the five others, once
        dry = upgrade(stack, "--dry-run")
        assert "would copy 5 instance(s)" in dry and "2 already there" in dry
        assert set(engine_state_topic(stack)) == {"old-0", "new-1"}
        first = upgrade(stack)
        assert "copied 5 instance(s)" in first and "2 already there" in first
        copied = engine_state_topic(stack)
        assert copied == {**{iid: st for iid, st in old.items() if iid != "old-0"}, "old-0": newer,
                          "new-1": {"id": "new-1"}}
        second = upgrade(stack)
        assert "copied 0 instance(s)" in second and "7 already there" in second

        # 3. an engine with an empty state dir restores them and finishes them
        engine = stack.start_engine()
        restored = {iid: engine.store.get(partition_for(iid, PARTITIONS)).get(iid) for iid in old}
        assert restored == {**old, "old-0": newer}
        for iid in old:
            stack.client.signal(iid, "go", iid)
        for i in range(6):
            assert stack.client.result(f"old-{i}", timeout=60) == {"input": {"i": i}, "got": f"old-{i}"}
    finally:
        stack.close()
