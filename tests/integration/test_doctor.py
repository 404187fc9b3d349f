"""``kflow doctor`` against the real test broker: a healthy prefix, a broken one, and no broker at all."""

from __future__ import annotations

import uuid

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from typer.testing import CliRunner

from kflow._cli.doctor import FAIL, OK, WARN, run_checks
from kflow.cli import app
from kflow.client import Client
from kflow.config import KafkaConfig
from kflow.model.messages import Definition
from kflow.schemas.codec import encode_definition
from kflow.streams.topics import TopicNames, ensure_topics

PARTITIONS = 3


def _by_name(checks):
    return {c.name: c for c in checks}


def test_healthy_topics_pass(kafka_bootstrap):
    prefix = f"dh{uuid.uuid4().hex[:8]}."
    cfg = KafkaConfig(bootstrap=kafka_bootstrap, topic_prefix=prefix, partitions=PARTITIONS, dev_tuning=True)
    ensure_topics(cfg.client_conf(), cfg.names, cfg.topic_settings, queues=["default"])
    with Client(kafka_bootstrap, config=cfg) as c:
        c.deploy({"name": "doc", "version": 1, "steps": [{"id": "d", "succeed": "input"}]})
        c.start("doc", 1, id=f"doc-{uuid.uuid4().hex[:6]}")  # no engine: stays on commands, counted as lag
    checks = _by_name(run_checks(cfg.client_conf(), prefix, PARTITIONS))
    assert checks["broker reachable"].status == OK
    assert checks["topics exist"].status == OK
    assert checks["partitions (co-partitioning)"].status == OK
    assert checks["cleanup.policy"].status == OK
    assert checks[f"schema of {prefix}commands"].status == OK
    assert "1 of 1 newest records match command.avsc" in checks[f"schema of {prefix}commands"].detail
    assert checks[f"schema of {prefix}definitions"].status == OK
    assert checks[f"engine group {prefix}engine"].status == WARN  # no engine ran yet
    result = CliRunner().invoke(app, ["doctor", "-b", kafka_bootstrap, "--prefix", prefix,
                                      "--partitions", str(PARTITIONS)])
    assert result.exit_code == 0, result.output
    assert "FAIL" not in result.output and "broker reachable" in result.output


def test_broken_topics_are_reported_with_a_fix(kafka_bootstrap):
    prefix = f"db{uuid.uuid4().hex[:8]}."
    names = TopicNames(prefix)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    topics = [NewTopic(names.commands, PARTITIONS, 1, config={"cleanup.policy": "delete"}),
              NewTopic(names.events, PARTITIONS + 1, 1, config={"cleanup.policy": "delete"}),  # not co-partitioned
              NewTopic(names.state, PARTITIONS, 1, config={"cleanup.policy": "delete"}),  # must be compact
              NewTopic(names.definitions, 1, 1, config={"cleanup.policy": "compact"})]
    for f in admin.create_topics(topics).values():
        f.result(30)
    # the newest record on the definitions topic is not Avro at all
    p = Producer({"bootstrap.servers": kafka_bootstrap})
    p.produce(names.definitions, encode_definition(Definition("x", 1, "spec", {"name": "x", "version": 1, "steps": []})),
              b"x@1")
    p.produce(names.definitions, b"garbage that is not avro", b"y@1")
    p.flush(30)
    checks = _by_name(run_checks({"bootstrap.servers": kafka_bootstrap}, prefix, PARTITIONS))
    part = checks["partitions (co-partitioning)"]
    assert part.status == FAIL and f"{names.events} has {PARTITIONS + 1}" in part.detail and "recreate" in part.fix
    policy = checks["cleanup.policy"]
    assert policy.status == FAIL and f"{names.state} is 'delete', expected 'compact'" in policy.detail
    assert "cleanup.policy=compact" in policy.fix
    missing = checks["topics exist"]
    assert missing.status == WARN and names.dlq in missing.detail and "kflow engine" in missing.fix
    schema = checks[f"schema of {names.definitions}"]
    assert schema.status == WARN and "not Avro single-object encoded" in schema.detail, schema
    result = CliRunner().invoke(app, ["doctor", "-b", kafka_bootstrap, "--prefix", prefix,
                                      "--partitions", str(PARTITIONS)])
    assert result.exit_code == 1
    assert "error: 2 check(s) failed: partitions (co-partitioning), cleanup.policy" in result.output


def test_unreachable_bootstrap_fails_fast_with_a_hint():
    checks = run_checks({"bootstrap.servers": "127.0.0.1:1"}, "kflow.", PARTITIONS, connect_timeout=2)
    assert [c.status for c in checks] == [FAIL]
    assert "no answer from 127.0.0.1:1" in checks[0].detail and "KFLOW_BOOTSTRAP" in checks[0].fix
    result = CliRunner().invoke(app, ["doctor", "-b", "127.0.0.1:1", "--timeout", "2"])
    assert result.exit_code == 1 and "error: 1 check(s) failed: broker reachable" in result.output


def test_transactional_topics_are_compared_after_a_workflow_ran(stack):
    """``events``, ``state`` and ``tasks.*`` end in commit markers: doctor reads back to the last record."""
    from tests.integration.conftest import PARTITIONS as STACK_PARTITIONS
    from tests.integration.flows import chain

    stack.client.deploy(chain("doctor_chain", 2))
    assert stack.client.start("doctor_chain", 1, id=f"dc-{uuid.uuid4().hex[:6]}").result(timeout=60) == 3
    cfg = stack.kafka_config(KafkaConfig)
    checks = _by_name(run_checks(cfg.client_conf(), stack.prefix, STACK_PARTITIONS))
    for topic, avsc in (("events", "event"), ("state", "state"), ("tasks.default", "task")):
        check = checks[f"schema of {stack.prefix}{topic}"]
        assert check.status == OK, check
        assert "newest records match" in check.detail and f"{avsc}.avsc" in check.detail, check
        assert "no committed record" not in check.detail, check
