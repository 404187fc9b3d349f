"""The visibility projection against a real broker: a recorded stream of state, events and
definitions records is folded into SQLite and PostgreSQL stores; folding it twice, or with a
restart in the middle, yields the same store, and search attribute filters find the right rows."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from confluent_kafka import Producer

from kflow.config import VisibilityConfig
from kflow.model.messages import Definition
from kflow.schemas.codec import encode_definition, encode_engine_state, encode_event
from kflow.streams.topics import ensure_topics
from kflow.testing.harness import EngineHarness
from kflow.visibility.projection import ProjectionProcessor
from kflow.visibility.store import InstanceFilter, VisibilityStore, metadata

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

ORDER = {"name": "vis_rec", "version": 1, "steps": [
    {"id": "tag", "set": {"n": "input.n"}, "search": {"customer": "input.customer", "n": "input.n"}},
    {"id": "charge", "task": "charge", "output": "r"},
    {"id": "approve", "wait": {"signal": "ok"}, "search": {"stage": "'approval'"}},
    {"id": "done", "succeed": "{'r': r}"},
]}


class _Recorder(EngineHarness):
    """An engine harness that keeps every state and event record it produced, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[str, str, bytes]] = []  # (kind, key, value)

    def _process(self, cmd: Any) -> Any:
        d = super()._process(cmd)
        if d.state is not None and d.events:
            for ev in d.events:
                self.records.append(("events", ev.instance_id, encode_event(ev)))
            self.records.append(("state", cmd.instance_id, encode_engine_state(cmd.instance_id, d.state)))
        return d


def _record_stream() -> _Recorder:
    h = _Recorder()
    h.deploy(ORDER)
    h.activity("charge", lambda x: {"charged": True})
    customers = ["acme", "globex", "acme", "initech", "umbrella", "acme"]
    for i, customer in enumerate(customers):
        h.start("vis_rec", f"rec-{i}", {"customer": customer, "n": i})
    for i in (0, 1, 3):
        h.signal(f"rec-{i}", "ok", {"by": "ann"})
    h.send("TerminateWorkflow", "rec-4", reason="test")
    return h


@pytest.fixture(scope="module")
def stream(kafka_bootstrap: str) -> tuple[VisibilityConfig, _Recorder]:
    """The recorded stream, produced once to fresh topics."""
    prefix = f"v{uuid.uuid4().hex[:8]}."
    config = VisibilityConfig(bootstrap=kafka_bootstrap, topic_prefix=prefix, partitions=3, dev_tuning=True)
    ensure_topics(config.client_conf(), config.names, config.topic_settings)
    h = _record_stream()
    p = Producer(config.producer_conf())
    d = Definition("vis_rec", 1, "spec", ORDER, deployed_ms=1)
    p.produce(config.names.definitions, encode_definition(d), d.key.encode())
    topics = {"events": config.names.events, "state": config.names.engine_state}
    for kind, key, value in h.records:
        p.produce(topics[kind], value, key.encode())
    assert p.flush(30) == 0
    return config, h


def _pg_url() -> Iterator[str]:
    """A fresh database on the local PostgreSQL, or on one started from the pgserver wheel."""
    name = f"kflow_vis_{uuid.uuid4().hex[:10]}"
    admin_url = PG_ADMIN
    server = None
    try:
        sa.create_engine(admin_url).connect().close()
    except sa.exc.OperationalError:
        import tempfile

        import pgserver  # a real PostgreSQL server from a wheel, when none runs locally

        server = pgserver.get_server(tempfile.mkdtemp(prefix="kflow-pg-"))
        admin_url = server.get_uri().replace("postgresql://", "postgresql+psycopg://")
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        if server is not None:
            server.cleanup()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'vis.db'}"
    else:
        yield from _pg_url()


def _fold(config: VisibilityConfig, store: VisibilityStore, group: str, **kw: Any) -> ProjectionProcessor:
    proc = ProjectionProcessor(config, store, group_id=group)
    proc.run(threading.Event(), idle_timeout=kw.pop("idle_timeout", 0.8), **kw)
    return proc


def _dump(store: VisibilityStore) -> dict[str, list[tuple[Any, ...]]]:
    out = {}
    with store.engine.connect() as conn:
        for table in metadata.sorted_tables:
            if table.name == "kflow_offsets":
                continue
            rows = conn.execute(sa.select(table).order_by(*table.primary_key.columns)).all()
            out[table.name] = [tuple(r) for r in rows]
    return out


def test_fold_with_a_restart_then_fold_again_yields_the_same_store(stream, store_url):
    config, h = stream
    store = VisibilityStore(store_url)
    total = len(h.records) + 1  # and the definition
    try:
        # a first run stops half-way (a crash between batches looks the same to the store) ...
        group = f"g-{uuid.uuid4().hex[:6]}"
        first = _fold(config, store, group, max_records=total // 2, batch=7, idle_timeout=10)
        assert first.consumed == total // 2
        assert sum(store.offsets().values()) == total // 2
        assert len(_dump(store)["kflow_events"]) < sum(len(v) for v in h.history.values())
        # ... and a second one resumes from the offsets stored with the data: nothing re-read, nothing lost
        second = _fold(config, store, group)
        assert second.consumed == total - total // 2
        folded = _dump(store)
        assert len(folded["kflow_instances"]) == 6
        assert len(folded["kflow_events"]) == sum(len(v) for v in h.history.values())
        assert {r["status"] for r in store.list_instances(InstanceFilter(), 50).items} == {"COMPLETED", "RUNNING",
                                                                                          "TERMINATED"}
        for iid, st in h.states.items():  # the rows carry exactly the engine's latest states
            row = store.get_instance(iid)
            assert row is not None and row["status"] == st["status"] and row["seq"] == st["seq"]
            assert row["search"] == st.get("search", {})

        # forget the offsets: the whole stream is folded a second time into the same store
        with store.engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM kflow_offsets"))
        again = _fold(config, store, f"g-{uuid.uuid4().hex[:6]}")
        assert again.records == total
        assert _dump(store) == folded

        def ids(**kw: Any) -> list[str]:
            return sorted(r["instance_id"] for r in store.list_instances(InstanceFilter(**kw), 100).items)

        assert ids(search=[("customer", "acme")]) == ["rec-0", "rec-2", "rec-5"]
        assert ids(search=[("customer", "acme"), ("stage", "approval")]) == ["rec-0", "rec-2", "rec-5"]
        assert ids(search=[("n", "3")]) == ["rec-3"]
        assert ids(search=[("customer", "acme")], status=["COMPLETED"]) == ["rec-0"]
        assert ids(search=[("customer", "nobody")]) == []
        assert store.counts(InstanceFilter(search=[("customer", "acme")]))["RUNNING"] == 2
    finally:
        store.close()
