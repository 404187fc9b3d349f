"""Process configuration: one pydantic-settings class per process kind, every field a ``KFLOW_*`` variable.

``KafkaConfig`` is shared (bootstrap, topic prefix, partitions, librdkafka pass-through);
``EngineConfig`` and ``WorkerConfig`` add their own knobs. Values are validated before any
consumer starts, so a bad setting is a clear start-up error. The configuration table (docs/configuration.md) is
generated from these field descriptions (``python -m kflow._config_doc``).

A running ``kflow dev`` writes how to reach it to :data:`DEV_FILE` in the folder it was started in
(:class:`DevStackFile`); CLI commands started there without a bootstrap use it.
:func:`fit_to_cluster` makes a long-running process follow the partition count of topics that
already exist (unless the count was configured explicitly) and use fast group joins on the
embedded broker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, TypeVar

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from kflow.model.errors import KflowError
from kflow.model.topics import TopicNames, TopicSettings

if TYPE_CHECKING:
    from kflow.security.tokens import CommandSigner, Keys

_C = TypeVar("_C", bound="TelemetryConfig")
_K = TypeVar("_K", bound="KafkaConfig")


#: The logger librdkafka's own log lines go to (levels mapped from syslog: notice → INFO).
KAFKA_LOGGER = "kflow.kafka"
#: Group settings for dev brokers: a join takes about 3 s on the embedded broker instead of 20+ s.
DEV_GROUP_TUNING: dict[str, Any] = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}
#: max.poll.interval.ms of engines under dev tuning.
DEV_MAX_POLL_INTERVAL_MS = 20_000
#: Where a running ``kflow dev`` says how to reach it, relative to the folder it was started in.
DEV_FILE = Path(".kflow") / "dev.json"

#: Prefix of the librdkafka pass-through variables.
KAFKA_ENV_PREFIX = "KFLOW_KAFKA_"
_LIBRDKAFKA_NAME = re.compile(r"^[a-z][a-z0-9]*(\.[a-z0-9]+)*$")
#: librdkafka settings whose values are secrets: never logged, masked by :func:`redact`.
SECRET_KAFKA_KEYS = frozenset({"sasl.password", "ssl.key.password", "ssl.keystore.password",
                               "sasl.oauthbearer.client.secret", "ssl.key.pem"})


def kafka_passthrough(environ: Any = None) -> dict[str, str]:
    """librdkafka settings from ``KFLOW_KAFKA_<NAME>`` variables (``SSL_CA_LOCATION`` → ``ssl.ca.location``).

    Raises:
        ValueError: a variable's name does not map to a librdkafka property name.
    """
    env = os.environ if environ is None else environ
    own = _own_kafka_variables()
    out: dict[str, str] = {}
    for key, value in env.items():
        if not key.startswith(KAFKA_ENV_PREFIX) or key in own:
            continue
        name = key[len(KAFKA_ENV_PREFIX):].lower().replace("_", ".")
        if not _LIBRDKAFKA_NAME.match(name):
            raise ValueError(f"{key} does not name a librdkafka setting (expected KFLOW_KAFKA_<NAME> with "
                             "NAME the property in upper case and '_' for '.', e.g. KFLOW_KAFKA_SSL_CA_LOCATION)")
        out[name] = value
    return out


def _own_kafka_variables() -> set[str]:
    """``KFLOW_KAFKA_*`` variables that are fields of a settings class (not passed through)."""
    own: set[str] = set()
    todo: list[type] = [TelemetryConfig]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        own.update(f"KFLOW_{name.upper()}" for name in getattr(cls, "model_fields", {}) if name.startswith("kafka_"))
    return own


def redact(conf: dict[str, Any]) -> dict[str, Any]:
    """A copy of a librdkafka configuration that is safe to log."""
    return {k: ("***" if k in SECRET_KAFKA_KEYS or "password" in k or "secret" in k else v) for k, v in conf.items()}


#: Default port of /metrics, /healthz and /readyz per kind of process (``KFLOW_METRICS_PORT`` overrides).
DEFAULT_METRICS_PORTS = {"engine": 9464, "worker": 9465, "connect": 9466}


class TelemetryConfig(BaseSettings):
    """Logging and tracing settings every kflow process (and every CLI command) shares."""

    model_config = SettingsConfigDict(env_prefix="KFLOW_", extra="ignore")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="Log level of kflow's loggers (DEBUG, INFO, WARNING, ERROR).")
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="Log format: `json` (one object per line), `text`, or `auto` (text on a terminal, JSON otherwise).")
    otlp_endpoint: str = Field(
        "", description="OTLP/HTTP endpoint spans are exported to (e.g. http://otel-collector:4318); also read from OTEL_EXPORTER_OTLP_ENDPOINT; empty: tracing is a no-op.")
    service_name: str = Field("", description="service.name of exported spans and logs (default: kflow-<process kind>).")

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _normalise_case(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value.upper() if value.lower() not in ("auto", "json", "text") else value.lower()
        return value


class KafkaConfig(TelemetryConfig):
    """Settings every kflow process shares.

    Besides the fields below, every ``KFLOW_KAFKA_<NAME>`` variable is passed to librdkafka as
    ``<name>`` (``_`` becomes ``.``), so TLS, SASL/SCRAM and SASL/OAUTHBEARER work unchanged.
    """

    model_config = SettingsConfigDict(env_prefix="KFLOW_", extra="ignore")

    bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers (host:port[,host:port]).")
    topic_prefix: str = Field("kflow.", description="Prefix of every kflow topic, so environments can share a cluster.")
    partitions: int = Field(8, ge=1, le=10_000, description="Partition count of every instance-keyed topic (created at start-up); when unset, long-running commands use the count of topics that already exist.")
    replication: int = Field(1, ge=1, description="Replication factor of topics kflow creates.")
    kafka_security_protocol: str | None = Field(None, description="librdkafka security.protocol (e.g. SASL_SSL).")
    kafka_sasl_mechanism: str | None = Field(None, description="librdkafka sasl.mechanism (PLAIN, SCRAM-SHA-512, ...).")
    kafka_sasl_username: str | None = Field(None, description="SASL username.")
    kafka_sasl_password: SecretStr | None = Field(None, description="SASL password (never logged).")
    fetch_wait_ms: int = Field(10, ge=0, le=10_000, description="Most time a broker may hold a fetch when no data is there (fetch.wait.max.ms); low values cut latency.")
    metrics_port: Optional[int] = Field(None, ge=0, le=65535, description="Port of /metrics, /healthz and /readyz of a long-running process; 0 disables. Unset: each kind of process has its own (engine 9464, worker 9465, connect 9466), so they can share a host.")
    dev_tuning: bool = Field(False, description="Short group session/heartbeat timeouts (6 s / 0.5 s) for dev brokers; long-running commands switch it on by themselves against the embedded broker.")
    auth: bool = Field(False, description="Authenticated commands (`on`/`off`, for every process): engines refuse a command without a valid signed token in its `kflow.auth` header, an activity result without its attempt's token, and whatever the policy (the `policies` topic) does not allow; clients sign with KFLOW_TOKEN. Off: anyone who can write to the commands topic can do anything.")
    jwt_secret: SecretStr | None = Field(None, description="HS256 secret (at least 32 bytes) that signs and verifies tokens; an engine with auth on needs it (it also signs attempt tokens and its own commands). Never logged.")
    jwks_file: str = Field("", description="JSON Web Key Set file of RS256/ES256 public keys (e.g. an OIDC provider's) that verify tokens.")
    signing_key: SecretStr | None = Field(None, description="What clients sign command tokens with: the path of a PEM private key (RS256/ES256, its public key in the engines' JWKS file) or an HS256 secret; default KFLOW_JWT_SECRET. Never logged.")
    token: SecretStr | None = Field(None, description="The principal token (`kflow token issue`) clients and the CLI sign their commands as; with it set, every command carries a `kflow.auth` header. Never logged.")
    command_ttl_ms: int = Field(600_000, ge=1000, description="How long a signed command stays valid: at least as long as a command may wait in the commands topic before an engine reads it.")
    schema_registry_url: str = Field("", description="Confluent Schema Registry URL (`http(s)://host:8081`, credentials as `https://user:pass@host`; `mock://name` for an in-process one in tests). Set: every kflow process registers each topic's value schema under `<topic>-value` (compatibility BACKWARD) and writes Confluent-framed Avro that stock deserializers read; readers accept both framings. Needs the `registry` extra.")

    def keys(self) -> Keys:
        """The :class:`~kflow.security.Keys` of ``jwt_secret``, ``jwks_file`` and ``signing_key``.

        Raises:
            KeyConfigError: a key is set but unusable (the message names the variable, never the secret).
        """
        from kflow.security.tokens import Keys

        return Keys.from_values(self.jwt_secret.get_secret_value() if self.jwt_secret else None, self.jwks_file or None,
                                self.signing_key.get_secret_value() if self.signing_key else None)

    def command_signer(self) -> Optional[CommandSigner]:
        """The :class:`~kflow.security.CommandSigner` of this process's commands, or None when it
        has no ``token`` and auth is off (commands go unsigned).

        Raises:
            KeyConfigError: auth is on without a token, or the keys are unusable.
        """
        from kflow.security.tokens import CommandSigner, KeyConfigError

        if self.token is None:
            if self.auth:
                raise KeyConfigError("KFLOW_AUTH is on: set KFLOW_TOKEN to a principal token (kflow token issue) "
                                     "so commands can be signed")
            return None
        return CommandSigner(self.token.get_secret_value(), self.keys(), self.command_ttl_ms / 1000)

    def metrics_port_for(self, kind: str) -> int:
        """The port of ``kind``'s operations endpoint: ``metrics_port`` when set, else the kind's own."""
        return self.metrics_port if self.metrics_port is not None else DEFAULT_METRICS_PORTS.get(kind, 9464)

    @field_validator("bootstrap")
    @classmethod
    def _check_bootstrap(cls, value: str) -> str:
        for server in value.split(","):
            server = server.strip()
            host, sep, port = server.rpartition(":")
            bracketed = server.startswith("[") and server.endswith("]")  # IPv6 without a port
            if not server or (sep and not bracketed and (not host or not port.isdigit())):
                raise ValueError(f"expected host[:port][,host[:port]], but got {value!r}")
        kafka_passthrough()  # a malformed KFLOW_KAFKA_* name fails here, before any client starts
        return value

    @property
    def names(self) -> TopicNames:
        return TopicNames(self.topic_prefix)

    @field_validator("schema_registry_url")
    @classmethod
    def _check_registry_url(cls, value: str) -> str:
        for url in filter(None, (u.strip() for u in value.split(","))):
            if not url.startswith(("http://", "https://", "mock://")):
                raise ValueError(f"expected http(s)://host[:port] or mock://name, but got {url!r}")
        return value.strip()

    @property
    def topic_settings(self) -> TopicSettings:
        return TopicSettings(partitions=self.partitions, replication=self.replication,
                             schema_registry_url=self.schema_registry_url)

    def client_conf(self) -> dict[str, Any]:
        """librdkafka settings common to producers, consumers and admin clients.

        ``KFLOW_KAFKA_<NAME>`` pass-through settings come first, so the named fields win.
        librdkafka's own log lines go to the ``kflow.kafka`` logger (formatted and filtered like
        every other record) instead of raw stderr; they are delivered when the client is polled.
        """
        conf: dict[str, Any] = {**kafka_passthrough(), "bootstrap.servers": self.bootstrap,
                                "logger": logging.getLogger(KAFKA_LOGGER)}
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
            conf.update(DEV_GROUP_TUNING)
        conf.update(extra)
        return conf

    def producer_conf(self, **extra: Any) -> dict[str, Any]:
        """librdkafka producer settings. With a Schema Registry configured, the value schemas of
        kflow's topics are registered (once per process) before the first producer exists, so what
        it writes is Confluent-framed."""
        if self.schema_registry_url:
            from kflow.schemas.registry import activate  # the registry extra is needed only then

            activate(self.schema_registry_url, self.names)
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
    lanes: int = Field(1, ge=1, le=64, description="Transactions an engine keeps open side by side: partition p commits in lane p % lanes, each with its own transactional producer and thread. On Apache Kafka, lanes let one partition decide while another waits for its commit; brokers that serialise transactions (the embedded one) gain nothing, so the default is 1.")
    transaction_timeout_ms: int = Field(10_000, ge=1000, description="Kafka transaction timeout; bounds how long a crashed engine's open transaction can block readers.")
    static_membership: bool = Field(False, description="Join the engine group as a static member (group.instance.id = engine id) so a restarted engine takes its partitions back at once; needs a stable KFLOW_ENGINE_ID.")
    group_session_timeout_ms: int = Field(10_000, ge=1000, le=3_600_000, description="session.timeout.ms of the engine group: how long after an engine dies (no heartbeat) its partitions move to the others; at least the broker's group.min.session.timeout.ms (6000 by default). Dev tuning: 6000.")
    group_heartbeat_interval_ms: int = Field(1_000, ge=100, description="heartbeat.interval.ms of the engine group (sent by librdkafka's own thread, so a busy engine still heartbeats); at most a third of the session timeout. Dev tuning: 500.")
    group_max_poll_interval_ms: int = Field(300_000, ge=1000, description="max.poll.interval.ms of the engine group: an engine whose loop does not poll for this long (stuck, or restoring for longer) leaves the group and its partitions move. Dev tuning: 20000.")
    standby_replicas: int = Field(0, ge=0, le=100, description="Standby replicas (as Kafka Streams' num.standby.replicas): with N ≥ 1 an engine keeps warm copies of the `commands` partitions it does not own by tailing their `state` changelog into its RocksDB stores, so taking one over replays only the tail it had not applied. Which ones: every partition it does not own when the engine group has at most N+1 members or its members cannot be listed (the embedded broker), otherwise N copies per partition spread over the members by a fixed rule. Costs disk, CPU and a fetch stream per copy; 0 disables.")
    workflows: str = Field("", description="Comma-separated modules of code workflows to host.")
    activities: str = Field("", description="Comma-separated modules whose @kflow.activity functions the engine runs itself for local activities (local: true, ctx.local_activity); a local run holds up the engine, so keep them short.")
    max_history_events: int = Field(50_000, ge=100, description="Most events in one run of a code workflow; beyond it the run fails with HistoryLimitExceeded (use ctx.continue_as_new).")
    max_pending_activities: int = Field(1_000, ge=1, description="Most activities pending at once per instance; one more fails the workflow with LimitExceeded.")
    max_pending_timers: int = Field(5_000, ge=1, description="Most timers pending at once per instance.")
    max_pending_children: int = Field(1_000, ge=1, description="Most child workflows running at once per instance.")
    max_payload_bytes: int = Field(256 * 1024, ge=1024, description="Largest input, result or signal payload (JSON bytes) an instance accepts.")
    replay_cache_size: int = Field(100_000, ge=1000, description="With auth on: token ids an engine remembers per partition until they expire, so a replayed command is refused; when full, tokens expiring before the oldest forgotten one are refused (fail closed).")

    @field_validator("group_heartbeat_interval_ms")
    @classmethod
    def _check_heartbeat(cls, value: int, info: ValidationInfo) -> int:
        session = info.data.get("group_session_timeout_ms")
        if session is not None and value * 3 > session:
            raise ValueError(f"expected at most a third of KFLOW_GROUP_SESSION_TIMEOUT_MS ({session} ms), "
                             f"but got {value} ms")
        return value

    @field_validator("group_max_poll_interval_ms")
    @classmethod
    def _check_max_poll(cls, value: int, info: ValidationInfo) -> int:
        session = info.data.get("group_session_timeout_ms")
        if session is not None and value < session:
            raise ValueError(f"expected at least KFLOW_GROUP_SESSION_TIMEOUT_MS ({session} ms), but got {value} ms")
        return value

    def group_conf(self) -> dict[str, Any]:
        """librdkafka settings of the engine's group membership (see docs/operations.md, Failover).

        Explicit ``KFLOW_GROUP_*`` settings win; otherwise dev tuning picks the embedded broker's
        values. With ``KFLOW_KAFKA_GROUP_PROTOCOL=consumer`` (KIP-848) the broker owns session
        and heartbeat timing, so only ``max.poll.interval.ms`` is set.
        """
        dev = {"group_session_timeout_ms": DEV_GROUP_TUNING["session.timeout.ms"],
               "group_heartbeat_interval_ms": DEV_GROUP_TUNING["heartbeat.interval.ms"],
               "group_max_poll_interval_ms": DEV_MAX_POLL_INTERVAL_MS}

        def pick(name: str) -> int:
            chosen = self.dev_tuning and name not in self.model_fields_set
            return int(dev[name] if chosen else getattr(self, name))

        conf: dict[str, Any] = {"max.poll.interval.ms": pick("group_max_poll_interval_ms")}
        if kafka_passthrough().get("group.protocol", "classic") != "consumer":
            conf["session.timeout.ms"] = pick("group_session_timeout_ms")
            conf["heartbeat.interval.ms"] = pick("group_heartbeat_interval_ms")
        if self.static_membership:
            # a replacement engine with the same identity takes the dead one's partitions back at
            # once instead of waiting for its session to time out
            conf["group.instance.id"] = f"engine-{self.resolved_engine_id()}"
        return conf

    def limits(self) -> Any:
        """The per-instance :class:`~kflow.engine.activity.Limits` these settings describe."""
        from kflow.engine.activity import Limits

        return Limits(max_pending_activities=self.max_pending_activities, max_pending_timers=self.max_pending_timers,
                      max_pending_children=self.max_pending_children, max_payload_bytes=self.max_payload_bytes,
                      max_history_events=self.max_history_events)

    def resolved_engine_id(self) -> str:
        if self.engine_id:
            return self.engine_id
        basis = f"{socket.gethostname()}:{os.path.abspath(self.state_dir)}"
        return hashlib.sha1(basis.encode()).hexdigest()[:12]


class WorkerConfig(KafkaConfig):
    """Settings of an activity worker (``kflow worker``)."""

    concurrency: int = Field(32, ge=1, le=10_000, description="Activities in flight per worker process.")
    heartbeat_interval_ms: int = Field(5_000, ge=100, description="How often long activities heartbeat.")
    task_isolation: Literal["read_uncommitted", "read_committed"] = Field(
        "read_uncommitted", description="Isolation level workers read tasks with: `read_uncommitted` starts an activity as soon as the engine decided it, before its transaction commits (activities are at-least-once; a result for an attempt the engine never committed is rejected or re-run); `read_committed` waits for the commit.")
    result_linger_ms: float = Field(0, ge=0, le=1000, description="linger.ms of the worker's result producer; 0 sends each result at once (librdkafka still batches under load).")
    priority_policy: Literal["weighted", "strict"] = Field(
        "weighted", description="Which priority level a saturated worker serves next: `weighted` (weights 100/50/20/10/5 for critical .. background; every level with work progresses) or `strict` (always the most urgent level with work).")
    read_ahead: int = Field(1_000, ge=0, le=100_000, description="Tasks a worker reads beyond the ones it runs, to choose among by priority level, starvation promotion and fairness key; a key's burst is shared fairly with other keys only within this window (see docs/priority.md). Memory: up to this many task records.")
    fairness_weights: dict[str, int] = Field({}, description='Weight per fairness key as a JSON object, e.g. `{"gold": 4, "acme": 2}`: within a queue and level a saturated worker starts tasks of the keys with work in weighted round robin; a key not named weighs 1.')
    promote_after_ms: int = Field(60_000, ge=0, description="A task waiting longer than this (since its record was written) counts as one level more urgent when a saturated worker chooses, one more after each further period, at most `KFLOW_MAX_PROMOTIONS` levels; 0 never promotes.")
    max_promotions: int = Field(2, ge=0, le=4, description="Most levels a waiting task is promoted by (see `KFLOW_PROMOTE_AFTER_MS`); 0 never promotes.")

    @field_validator("fairness_weights")
    @classmethod
    def _check_weights(cls, value: dict[str, int]) -> dict[str, int]:
        bad = {k: w for k, w in value.items() if w < 1}
        if bad:
            raise ValueError(f"expected integer weights >= 1, but got {bad}")
        return value
    connectors: str = Field("", description="Connectors file (YAML) whose operations this worker also serves (`kflow worker --connectors`).")
    connector_http_port: int = Field(8089, ge=0, le=65535, description="Port of the connectors' webhook callback server (`POST /callbacks/<token>`); 0 picks a free port.")
    connector_public_url: str = Field("", description="Base URL external systems reach the webhook callback server at (default http://<hostname>:<port>).")


class TriggerConfig(KafkaConfig):
    """Settings of the trigger runner (``kflow triggers run``)."""

    mqtt_url: str = Field("mqtt://127.0.0.1:1883", description="MQTT broker of triggers with an `mqtt` source that names no host (and of `kflow dev --demo iot`).")
    trigger_group: str = Field("", description="Consumer group of Kafka trigger sources (default `<prefix>triggers`).")


class VisibilityConfig(KafkaConfig):
    """Settings of the read side (``kflow visibility``): projection, HTTP API and console."""

    state_dir: str = Field("./.kflow", description="Directory of the RocksDB state stores (one per partition).")
    visibility_url: str = Field("", description="SQLAlchemy URL of the visibility store, e.g. postgresql://user@host/db; empty: SQLite file visibility.db in KFLOW_STATE_DIR.")
    visibility_host: str = Field("127.0.0.1", description="Address the visibility API and console listen on.")
    visibility_port: int = Field(8088, ge=0, le=65535, description="Port of the visibility API and console (also serves /metrics, /healthz, /readyz); 0 picks a free port.")
    visibility_group: str = Field("kflow-visibility", description="Consumer group of the visibility projection; processes sharing one PostgreSQL store share it.")
    api: str = Field("", description="URL of a visibility API (e.g. http://127.0.0.1:8088) that `kflow list/status/history` use instead of reading Kafka.")
    users_file: str = Field("", description="With auth on: YAML file of console users (`users: [{username, password_hash, tenant, roles}]`, argon2 hashes from `kflow token hash-password`) who log in to the console with a password.")
    api_keys_file: str = Field("", description="With auth on: YAML file of API keys (`api_keys: [{id, hash, principal, tenant, roles}]`, only SHA-256 hashes, lines from `kflow token apikey`) accepted in the `X-API-Key` header.")
    jwt_audience: str = Field("", description="With auth on: the `aud` an HTTP bearer token must name (e.g. the OIDC client id); empty: tokens with an `aud` claim are refused.")
    jwt_issuer: str = Field("", description="With auth on: the `iss` an HTTP bearer token must name (e.g. the OIDC provider's URL); empty: not checked.")
    session_ttl_ms: int = Field(28_800_000, ge=60_000, description="With auth on: how long a console login (the session cookie) lasts.")
    login_max_failures: int = Field(5, ge=1, description="With auth on: failed console logins allowed per user, and four times as many per client IP, within 15 minutes; more are refused with 429 until the window passes.")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest HTTP request body the visibility API reads (413 beyond); JSON bodies may nest at most 64 levels (422 beyond).")
    subscriptions_url: str = Field("", description="Comma-separated base URLs of the operations endpoints of `kflow subscriptions run` processes (e.g. http://subs:9467); the console's Subscriptions page shows the delivery log each keeps in memory. Empty: the page lists the subscriptions without deliveries.")

    def store_url(self) -> str:
        """The configured store URL, or the default SQLite file in the state directory."""
        if self.visibility_url:
            return self.visibility_url
        from pathlib import Path

        path = Path(self.state_dir).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path / 'visibility.db'}"


class ConfigError(KflowError):
    """A setting has a bad value; ``problems`` lists ``(variable, what is wrong)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("bad configuration: " + "; ".join(f"{var}: {what}" for var, what in problems))


def load_config(cls: type[_C], **overrides: Any) -> _C:
    """Build ``cls`` from ``KFLOW_*`` variables and ``overrides``; a bad value is one :class:`ConfigError`.

    The error names the environment variable and what is wrong with it, e.g.
    ``bad configuration: KFLOW_MAX_BATCH: Input should be greater than or equal to 1 (got '0')``.
    """
    unknown = sorted(set(overrides) - set(cls.model_fields))
    if unknown:
        raise ConfigError([(f"KFLOW_{n.upper()}", f"no such setting of {cls.__name__} (known: "
                            f"{', '.join(sorted(cls.model_fields))})") for n in unknown])
    try:
        return cls(**overrides)
    except SettingsError as exc:  # a JSON-valued setting (e.g. KFLOW_FAIRNESS_WEIGHTS) is not JSON
        m = re.search(r'field "(\w+)"', str(exc))
        name = m.group(1) if m else "?"
        raise ConfigError([(f"KFLOW_{name.upper()}", "expected a JSON value, e.g. {\"gold\": 4} (got "
                            f"{os.environ.get(f'KFLOW_{name.upper()}', '')!r})")]) from None
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = str(err["loc"][0]) if err["loc"] else "?"
            got = err.get("input")
            shown = "***" if "password" in name or "secret" in name else repr(got)
            msg = str(err["msg"]).removeprefix("Value error, ")
            problems.append((f"KFLOW_{name.upper()}", msg if err["type"] == "value_error" else f"{msg} (got {shown})"))
        raise ConfigError(problems) from None


# --------------------------------------------------------------------------- the dev stack's file


@dataclass(frozen=True)
class DevStackFile:
    """How to reach a running ``kflow dev`` stack (the contents of :data:`DEV_FILE`)."""

    bootstrap: str
    prefix: str
    partitions: int
    pid: int
    path: Path = DEV_FILE

    def environ(self) -> dict[str, str]:
        """The ``KFLOW_*`` variables that point a process at this stack (dev group tuning included)."""
        return {"KFLOW_BOOTSTRAP": self.bootstrap, "KFLOW_TOPIC_PREFIX": self.prefix,
                "KFLOW_PARTITIONS": str(self.partitions), "KFLOW_DEV_TUNING": "true"}

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"bootstrap": self.bootstrap, "prefix": self.prefix,
                                   "partitions": self.partitions, "pid": self.pid}, indent=2) + "\n")
        tmp.replace(self.path)  # readers never see a half-written file

    def remove(self) -> None:
        """Delete the file if it is still this stack's (another stack may have replaced it)."""
        current = read_dev_file(self.path, check_alive=False)
        if current is not None and current.pid == self.pid:
            self.path.unlink(missing_ok=True)
            try:
                self.path.parent.rmdir()  # only when empty: an engine's default state dir is .kflow too
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_dev_file(path: Path = DEV_FILE, *, check_alive: bool = True) -> Optional[DevStackFile]:
    """The dev stack described by ``path``, or None when there is none (or its process is gone)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        dev = DevStackFile(str(doc["bootstrap"]), str(doc["prefix"]), int(doc["partitions"]), int(doc["pid"]), path)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if check_alive and not _alive(dev.pid):
        return None  # left behind by a stack that was killed
    return dev


# --------------------------------------------------------------------------- fitting a process to its cluster

#: Cluster ids of the embedded broker (``kflow dev``, tests) start with this.
DEV_CLUSTER_PREFIX = "kflow-dev-"


def cluster_facts(config: KafkaConfig, timeout: float = 10.0) -> tuple[str, Optional[int]]:
    """The cluster id, and the partition count of the commands topic under ``config``'s prefix (None if absent).

    Raises:
        BrokerUnavailable: the cluster did not answer within ``timeout``.
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from kflow.model.errors import BrokerUnavailable

    admin = AdminClient({**config.client_conf(), "socket.connection.setup.timeout.ms": int(timeout * 1000)})
    try:
        meta = admin.list_topics(timeout=timeout)  # all topics: naming one may auto-create it
    except KafkaException as exc:
        raise BrokerUnavailable(config.bootstrap, str(exc.args[0].str() if exc.args else exc)) from None
    found = meta.topics.get(config.names.commands)
    partitions = len(found.partitions) if found is not None and found.error is None and found.partitions else None
    return str(meta.cluster_id or ""), partitions


def existing_partitions(config: KafkaConfig, timeout: float = 10.0) -> Optional[int]:
    """Partition count of the commands topic under ``config``'s prefix, or None if it does not exist."""
    return cluster_facts(config, timeout)[1]


def fit_to_cluster(config: _K, timeout: float = 10.0) -> _K:
    """``config`` adjusted to the cluster it talks to, for settings the user did not set explicitly.

    - ``partitions`` follows the instance topics that already exist, so a process started beside
      ``kflow dev`` (4 partitions) works; an explicit count (``KFLOW_PARTITIONS``, ``--partitions``)
      is kept, and a real mismatch stays the start-up error
      :class:`~kflow.streams.topics.PartitionCountMismatch`.
    - ``dev_tuning`` is switched on for the embedded broker (its cluster id starts with
      :data:`DEV_CLUSTER_PREFIX`), whose group joins take 20+ s with librdkafka's defaults.

    Raises:
        BrokerUnavailable: the cluster did not answer within ``timeout``.
    """
    cluster_id, found = cluster_facts(config, timeout)
    update: dict[str, Any] = {}
    if "partitions" not in config.model_fields_set and found is not None and found != config.partitions:
        logging.getLogger("kflow.config").info("topics under prefix '%s' exist with %d partitions; using that count",
                                               config.topic_prefix, found)
        update["partitions"] = found
    if "dev_tuning" not in config.model_fields_set and cluster_id.startswith(DEV_CLUSTER_PREFIX):
        update["dev_tuning"] = True
    return config.model_copy(update=update) if update else config
