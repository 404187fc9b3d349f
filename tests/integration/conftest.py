"""Engine and worker fixtures for integration tests: real broker, real processors (threads or processes)."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from kflow.client import Client
from kflow.config import EngineConfig, WorkerConfig
from kflow.streams.processor import EngineProcessor
from kflow.worker import Worker

PARTITIONS = 4

#: A race of the embedded broker, shown by ``test_broker_fixture``'s concurrent-producers test.
TANSU_TAILING_READER_SKIPS = (
    "Tansu: with several producers writing one partition, a reader at the end of the log sometimes skips a "
    "record (a fresh reader of the same log sees it): a command then never reaches the engine"
)


def xfail_where_tansu_skips(request: pytest.FixtureRequest, kafka_flavor: str, what: str) -> None:
    """Mark a test whose workload loses, on the embedded broker, to its tailing-reader race: ``what``
    says what then stalls. Not strict (a race); on Apache Kafka the test must pass."""
    if kafka_flavor == "tansu":
        request.applymarker(pytest.mark.xfail(reason=f"{TANSU_TAILING_READER_SKIPS}; here: {what}", strict=False))


class Stack:
    """An engine and workers in this process, on one topic prefix."""

    def __init__(self, bootstrap: str, prefix: str, state_root: str) -> None:
        self.bootstrap, self.prefix, self.state_root = bootstrap, prefix, state_root
        self.engines: list[tuple[EngineProcessor, threading.Thread]] = []
        self.workers: list[Worker] = []
        self.client = Client(bootstrap, config=self.kafka_config(WorkerConfig))

    def kafka_config(self, cls: Any, **kw: Any) -> Any:
        return cls(bootstrap=self.bootstrap, topic_prefix=self.prefix, partitions=PARTITIONS, dev_tuning=True, **kw)

    def start_engine(self, **kw: Any) -> EngineProcessor:
        cfg = self.kafka_config(EngineConfig, state_dir=f"{self.state_root}/e{len(self.engines)}",
                                engine_id=uuid.uuid4().hex[:8], **kw)
        proc = EngineProcessor(cfg)
        t = threading.Thread(target=proc.run, name="engine", daemon=True)
        t.start()
        assert proc.ready.wait(60), "engine did not get partitions within 60s"
        self.engines.append((proc, t))
        return proc

    def start_worker(self, activities: Any, **kw: Any) -> Worker:
        w = Worker(self.kafka_config(WorkerConfig, **kw), activities)
        w.start_in_thread()
        self.workers.append(w)
        return w

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        for proc, t in self.engines:
            proc.stop()
            t.join(30)
        self.client.close()


@pytest.fixture(scope="module")
def stack(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from tests.integration import flows

    prefix = f"m{uuid.uuid4().hex[:8]}."
    s = Stack(kafka_bootstrap, prefix, str(tmp_path_factory.mktemp("stack")))
    s.start_engine()
    s.start_worker([flows])
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def engine_only_stack(kafka_bootstrap: str, tmp_path: Any) -> Iterator[Stack]:
    """A private stack (own topic prefix) with an engine and no worker: the test starts its own."""
    s = Stack(kafka_bootstrap, f"e{uuid.uuid4().hex[:8]}.", str(tmp_path))
    try:
        s.start_engine()
        yield s
    finally:
        s.close()


@contextlib.contextmanager
def visibility_server(stack: Stack, tmp_path_factory: pytest.TempPathFactory, tag: str) -> Iterator[Any]:
    """A visibility projection + API + console on a free port, over ``stack``'s topics."""
    from kflow.config import VisibilityConfig
    from kflow.visibility.server import VisibilityServer

    cfg = stack.kafka_config(VisibilityConfig, state_dir=str(tmp_path_factory.mktemp(tag)), visibility_port=0,
                             visibility_group=f"{tag}-{uuid.uuid4().hex[:6]}")
    server = VisibilityServer(cfg)
    server.start()
    try:
        yield server
    finally:
        server.close()
