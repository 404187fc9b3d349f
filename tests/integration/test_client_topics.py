"""Clients never create topics: a missing layout is a precise error, and ``kflow topics ensure`` creates it."""

from __future__ import annotations

import pytest
from confluent_kafka.admin import AdminClient
from typer.testing import CliRunner

from kflow.cli import app
from kflow.client import Client
from kflow.config import KafkaConfig
from kflow.model.errors import KflowError


def _topics(bootstrap: str, prefix: str) -> set[str]:
    return {t for t in AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics if t.startswith(prefix)}


def test_client_refuses_to_run_without_topics_and_creates_none(kafka_bootstrap, topic_prefix):
    cfg = KafkaConfig(bootstrap=kafka_bootstrap, topic_prefix=topic_prefix, partitions=2)
    with Client(kafka_bootstrap, config=cfg) as client:
        with pytest.raises(KflowError, match=r"topics do not exist.*kflow topics ensure --prefix " + topic_prefix):
            client.start("anything", {})
    assert _topics(kafka_bootstrap, topic_prefix) == set()


def test_topics_ensure_creates_the_layout_a_client_then_uses(kafka_bootstrap, topic_prefix):
    out = CliRunner().invoke(app, ["topics", "ensure", "--bootstrap", kafka_bootstrap, "--prefix", topic_prefix,
                                   "--partitions", "2", "--queue", "payments"])
    assert out.exit_code == 0, out.output
    created = _topics(kafka_bootstrap, topic_prefix)
    for name in ("commands", "events", "state", "definitions", "dlq", "tasks.default", "tasks.payments"):
        assert f"{topic_prefix}{name}" in created, (name, sorted(created))
        assert f"{topic_prefix}{name}: " in out.output
    cfg = KafkaConfig(bootstrap=kafka_bootstrap, topic_prefix=topic_prefix, partitions=2)
    with Client(kafka_bootstrap, config=cfg) as client:
        deployed = client.deploy({"name": "noop", "version": 1, "steps": [{"id": "done", "succeed": "input"}]})
        assert deployed.version == 1
    again = CliRunner().invoke(app, ["topics", "ensure", "--bootstrap", kafka_bootstrap, "--prefix", topic_prefix,
                                     "--partitions", "2"])
    assert again.exit_code == 0, again.output  # idempotent


def test_topics_ensure_refuses_a_partition_count_that_disagrees(kafka_bootstrap, topic_prefix):
    args = ["topics", "ensure", "--bootstrap", kafka_bootstrap, "--prefix", topic_prefix]
    assert CliRunner().invoke(app, [*args, "--partitions", "2"]).exit_code == 0
    out = CliRunner().invoke(app, [*args, "--partitions", "3"])
    assert out.exit_code == 1 and "error:" in out.output and "partition" in out.output, out.output
