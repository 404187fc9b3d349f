"""Process configuration: one pydantic-settings class per process kind, every field a ``KFLOW_*`` variable.

``KafkaConfig`` is shared (bootstrap, topic prefix, partitions, librdkafka pass-through);
``EngineConfig`` and ``WorkerConfig`` add their own knobs. Values are validated before any
consumer starts, so a bad setting is a clear start-up error. The README's configuration table is
generated from these field descriptions (``kflow config --markdown``).
"""

from __future__ import annotations

import hashlib
import os
import socket
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from kflow.streams.topics import TopicNames, TopicSettings


class KafkaConfig(BaseSettings):
    """Settings every kflow process shares."""

    model_config = SettingsConfigDict(env_prefix="KFLOW_", extra="ignore")

    bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers (host:port[,host:port]).")
    topic_prefix: str = Field("kflow.", description="Prefix of every kflow topic, so environments can share a cluster.")
    partitions: int = Field(8, ge=1, le=10_000, description="Partition count of every instance-keyed topic (created at start-up).")
    replication: int = Field(1, ge=1, description="Replication factor of topics kflow creates.")
    kafka_security_protocol: str | None = Field(None, description="librdkafka security.protocol (e.g. SASL_SSL).")
    kafka_sasl_mechanism: str | None = Field(None, description="librdkafka sasl.mechanism (PLAIN, SCRAM-SHA-512, ...).")
    kafka_sasl_username: str | None = Field(None, description="SASL username.")
    kafka_sasl_password: SecretStr | None = Field(None, description="SASL password (never logged).")
    fetch_wait_ms: int = Field(10, ge=0, le=10_000, description="Most time a broker may hold a fetch when no data is there (fetch.wait.max.ms); low values cut latency.")
    metrics_port: int = Field(9464, ge=0, le=65535, description="Port of /metrics, /healthz and /readyz of engine and worker processes; 0 disables.")
    dev_tuning: bool = Field(False, description="Short group session/heartbeat timeouts for dev brokers (set by `kflow dev` and tests).")

    @property
    def names(self) -> TopicNames:
        return TopicNames(self.topic_prefix)

    @property
    def topic_settings(self) -> TopicSettings:
        return TopicSettings(partitions=self.partitions, replication=self.replication)

    def client_conf(self) -> dict[str, Any]:
        """librdkafka settings common to producers, consumers and admin clients."""
        conf: dict[str, Any] = {"bootstrap.servers": self.bootstrap}
        if self.kafka_security_protocol:
            conf["security.protocol"] = self.kafka_security_protocol
        if self.kafka_sasl_mechanism:
            conf["sasl.mechanism"] = self.kafka_sasl_mechanism
        if self.kafka_sasl_username:
            conf["sasl.username"] = self.kafka_sasl_username
        if self.kafka_sasl_password:
            conf["sasl.password"] = self.kafka_sasl_password.get_secret_value()
        return conf

    def consumer_conf(self, group_id: str, **extra: Any) -> dict[str, Any]:
        conf = {**self.client_conf(), "group.id": group_id, "enable.auto.commit": False,
                "auto.offset.reset": "earliest", "isolation.level": "read_committed",
                "enable.partition.eof": False, "fetch.wait.max.ms": self.fetch_wait_ms}
        if self.dev_tuning:
            conf.update({"session.timeout.ms": 6000, "heartbeat.interval.ms": 500})
        conf.update(extra)
        return conf

    def producer_conf(self, **extra: Any) -> dict[str, Any]:
        conf = {**self.client_conf(), "partitioner": "murmur2_random", "linger.ms": 2,
                "enable.idempotence": True, "compression.type": "none"}
        conf.update(extra)
        return conf


class EngineConfig(KafkaConfig):
    """Settings of the engine processor (``kflow engine``)."""

    state_dir: str = Field("./.kflow", description="Directory of the RocksDB state stores (one per partition).")
    engine_id: str = Field("", description="Stable identity of this engine process (transactional.id suffix); default derives from host and state dir.")
    max_batch: int = Field(500, ge=1, le=100_000, description="Most commands decided in one transaction.")
    poll_timeout_ms: int = Field(20, ge=1, description="How long one poll waits for commands.")
    cache_size: int = Field(50_000, ge=0, description="Instance states kept in memory per engine (LRU).")
    timer_batch: int = Field(1000, ge=1, description="Most timers fired per partition per transaction.")
    transaction_timeout_ms: int = Field(10_000, ge=1000, description="Kafka transaction timeout; bounds how long a crashed engine's open transaction can block readers.")
    static_membership: bool = Field(False, description="Join the engine group as a static member (group.instance.id = engine id) so a restarted engine takes its partitions back at once; needs a stable KFLOW_ENGINE_ID.")
    workflows: str = Field("", description="Comma-separated modules of code workflows to host.")

    def resolved_engine_id(self) -> str:
        if self.engine_id:
            return self.engine_id
        basis = f"{socket.gethostname()}:{os.path.abspath(self.state_dir)}"
        return hashlib.sha1(basis.encode()).hexdigest()[:12]


class WorkerConfig(KafkaConfig):
    """Settings of an activity worker (``kflow worker``)."""

    concurrency: int = Field(32, ge=1, le=10_000, description="Activities in flight per worker process.")
    heartbeat_interval_ms: int = Field(5_000, ge=100, description="How often long activities heartbeat.")
