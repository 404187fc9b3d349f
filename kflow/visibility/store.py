"""The visibility store: SQLAlchemy Core tables, their indexes, and every read and write on them.

One schema serves SQLite (the default, a file in the state directory) and PostgreSQL. Tables:

- ``instances`` — one row per instance id, the latest state record (with the full state JSON),
  indexed for status, workflow/version, tenant, start and close time, each with
  ``(started_ms, instance_id)`` so filtered lists page by cursor without sorting;
- ``search_attributes`` — ``(instance_id, name, value)`` rows, one per search attribute, indexed
  ``(name, value)`` for filters;
- ``events`` — the history, keyed ``(instance_id, seq)``;
- ``definitions`` — every deployed ``name@version``;
- ``offsets`` — the next offset to read per ``(topic, partition)``;
- ``objects`` — the latest state of every engine object that is not a workflow instance (schedules
  ``schedule:<id>``, limit counters ``limit:<name>[:<key>]``): they are decided like instances and
  share the ``state`` topic, but never appear in instance lists, counts or searches;
- ``meta`` — one-off facts about the store itself (which upgrades were applied).

:meth:`VisibilityStore.apply` writes a batch of records **and** the offsets after them in one
database transaction, so a crash leaves both or neither: on restart the projection resumes from
the stored offsets, and a record folded twice changes nothing (state rows only move forward in
``seq``, events and definitions are keyed).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import orjson

try:
    import sqlalchemy as sa
    from sqlalchemy.engine import Connection, Engine
except ModuleNotFoundError as exc:  # name the extra to install rather than the missing module
    raise ModuleNotFoundError("the visibility store needs the visibility extra: pip install 'kflow[visibility]'",
                              name=exc.name) from exc

from kflow.engine.search import search_text
from kflow.model.errors import KflowError
from kflow.visibility.graph import track_steps

__all__ = ["InstanceFilter", "FilterError", "OBJECT_PREFIXES", "Page", "Record", "VisibilityStore", "is_object",
           "search_text"]

log = logging.getLogger("kflow.visibility")

metadata = sa.MetaData()

instances = sa.Table(
    "kflow_instances", metadata,
    sa.Column("instance_id", sa.String(512), primary_key=True),
    sa.Column("workflow", sa.String(255), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False, default="spec"),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("tenant", sa.String(255), nullable=True),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("started_ms", sa.BigInteger, nullable=False),
    sa.Column("updated_ms", sa.BigInteger, nullable=False),
    sa.Column("closed_ms", sa.BigInteger, nullable=True),
    sa.Column("parent_id", sa.String(512), nullable=True),
    sa.Column("error_type", sa.String(255), nullable=True),
    sa.Column("error_message", sa.Text, nullable=True),
    sa.Column("search", sa.Text, nullable=False, default="{}"),
    sa.Column("steps", sa.Text, nullable=False, default="{}"),
    sa.Column("state", sa.Text, nullable=False, default="{}"),
    sa.Index("ix_kflow_instances_started", "started_ms", "instance_id"),
    sa.Index("ix_kflow_instances_status", "status", "started_ms", "instance_id"),
    sa.Index("ix_kflow_instances_workflow", "workflow", "version", "started_ms", "instance_id"),
    sa.Index("ix_kflow_instances_tenant", "tenant", "started_ms", "instance_id"),
    sa.Index("ix_kflow_instances_closed", "closed_ms"),
)

search_attributes = sa.Table(
    "kflow_search_attributes", metadata,
    sa.Column("instance_id", sa.String(512), primary_key=True),
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("value", sa.String(1024), nullable=False),
    sa.Index("ix_kflow_search_name_value", "name", "value", "instance_id"),
)

events = sa.Table(
    "kflow_events", metadata,
    sa.Column("instance_id", sa.String(512), primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("ts", sa.BigInteger, nullable=False),
    sa.Column("data", sa.Text, nullable=False),
)

definitions = sa.Table(
    "kflow_definitions", metadata,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("deployed_ms", sa.BigInteger, nullable=False),
)

offsets = sa.Table(
    "kflow_offsets", metadata,
    sa.Column("topic", sa.String(255), primary_key=True),
    sa.Column("partition", sa.Integer, primary_key=True),
    sa.Column("next_offset", sa.BigInteger, nullable=False),
)

objects = sa.Table(
    "kflow_objects", metadata,
    sa.Column("key", sa.String(512), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("updated_ms", sa.BigInteger, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Index("ix_kflow_objects_kind", "kind", "key"),
)

meta = sa.Table(
    "kflow_meta", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

#: Key prefixes of the engine objects that are not workflow instances.
OBJECT_PREFIXES = ("schedule:", "limit:")
#: State ``kind`` of a workflow instance; any other kind is an object.
INSTANCE_KINDS = ("spec", "code")
_OBJECTS_SPLIT = "objects_split"

#: Most rows one list call returns.
MAX_PAGE = 1000
STATUSES = ("RUNNING", "BLOCKED", "COMPENSATING", "CANCELLING", "SUSPENDED", "INCIDENT", "QUEUED", "COMPLETED",
            "FAILED", "CANCELLED", "TERMINATED")


class FilterError(KflowError):
    """A list filter or cursor is malformed; the message says which and why."""


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed record, decoded: ``kind`` is ``state``, ``event`` or ``definition``."""

    kind: str
    key: str
    value: Any  # state dict, Event, Definition, or None for a tombstone


@dataclass
class InstanceFilter:
    """Filters of an instance list; every given field must match (AND)."""

    status: list[str] = field(default_factory=list)
    workflow: Optional[str] = None
    version: Optional[int] = None
    tenant: Optional[str] = None
    started_after: Optional[int] = None
    started_before: Optional[int] = None
    closed_after: Optional[int] = None
    closed_before: Optional[int] = None
    search: list[tuple[str, str]] = field(default_factory=list)
    id_prefix: Optional[str] = None

    def __post_init__(self) -> None:
        bad = [s for s in self.status if s not in STATUSES]
        if bad:
            raise FilterError(f"unknown status {', '.join(bad)}: expected one of {', '.join(STATUSES)}")


@dataclass
class Page:
    """One page of a list: rows, and the cursor of the next page (None on the last)."""

    items: list[dict[str, Any]]
    next_cursor: Optional[str]


def encode_cursor(started_ms: int, instance_id: str) -> str:
    return base64.urlsafe_b64encode(_dumps([started_ms, instance_id]).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    """Raises FilterError when ``cursor`` is not one this store handed out."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        ms, iid = orjson.loads(raw)
        if not isinstance(ms, int) or not isinstance(iid, str):
            raise ValueError
        return ms, iid
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise FilterError(f"cursor {cursor!r} is not valid: pass the next_cursor of a previous page") from None


class VisibilityStore:
    """The visibility database behind the projection and the API.

    Args:
        url: A SQLAlchemy URL: ``sqlite:///path/visibility.db`` or ``postgresql+psycopg://...``
            (``postgresql://`` is read as psycopg 3).
    """

    def __init__(self, url: str) -> None:
        if url.startswith("postgresql://") or url.startswith("postgres://"):
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        self.url = url
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
        self.engine: Engine = sa.create_engine(url, **kwargs)
        self.dialect = self.engine.dialect.name
        if self.dialect == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)
        self._split_objects()

    def _split_objects(self) -> None:
        """Move object rows folded as instances by an older release into ``objects`` (once per store)."""
        with self.engine.begin() as conn:
            if conn.execute(sa.select(meta.c.value).where(meta.c.name == _OBJECTS_SPLIT)).first() is not None:
                return
            c = instances.c
            moved = conn.execute(sa.select(c.instance_id, c.kind, c.status, c.seq, c.updated_ms, c.state).where(
                sa.or_(c.kind.not_in(INSTANCE_KINDS),
                       *(c.instance_id.startswith(p, autoescape=True) for p in OBJECT_PREFIXES)))).all()
            for r in moved:
                doc = orjson.loads(r.state)
                self._upsert(conn, objects, {"key": r.instance_id, "kind": r.kind, "status": r.status, "seq": r.seq,
                                             "updated_ms": r.updated_ms, "state": _dumps(doc.get("internal") or {})},
                             ("key",), ("kind", "status", "seq", "updated_ms", "state"))
                conn.execute(search_attributes.delete().where(search_attributes.c.instance_id == r.instance_id))
                conn.execute(instances.delete().where(c.instance_id == r.instance_id))
            stmt = self._insert(meta).values(name=_OBJECTS_SPLIT, value=str(len(moved))).on_conflict_do_nothing()
            conn.execute(stmt)
            if moved:
                log.info("visibility store: moved %d schedule/limit row(s) out of the instances", len(moved))

    def close(self) -> None:
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"VisibilityStore({self.engine.url.render_as_string(hide_password=True)!r})"

    # -- writing ---------------------------------------------------------------------------

    def offsets(self) -> dict[tuple[str, int], int]:
        """The next offset to read per ``(topic, partition)``."""
        with self.engine.connect() as conn:
            return {(r.topic, r.partition): r.next_offset for r in conn.execute(sa.select(offsets))}

    def apply(self, records: Sequence[Record], next_offsets: dict[tuple[str, int], int]) -> set[str]:
        """Fold ``records`` and store ``next_offsets``, all in one transaction.

        Returns:
            The instance ids whose row changed.
        """
        changed: set[str] = set()
        with self.engine.begin() as conn:
            for rec in records:
                if rec.kind == "state":
                    if rec.value is None:  # a tombstone: the instance's (or object's) state was deleted
                        conn.execute(search_attributes.delete().where(search_attributes.c.instance_id == rec.key))
                        if conn.execute(instances.delete().where(instances.c.instance_id == rec.key)).rowcount:
                            changed.add(rec.key)
                        if conn.execute(objects.delete().where(objects.c.key == rec.key)).rowcount:
                            changed.add(rec.key)
                    elif is_object(rec.key, rec.value):
                        if self._put_object(conn, rec.value):
                            changed.add(rec.key)
                    elif self._put_state(conn, rec.value):
                        changed.add(rec.key)
                elif rec.kind == "event":
                    if self._put_event(conn, rec.value):
                        changed.add(rec.key)
                elif rec.kind == "definition" and rec.value is not None:
                    self._put_definition(conn, rec.value)
            for (topic, partition), nxt in next_offsets.items():
                self._upsert(conn, offsets, {"topic": topic, "partition": partition, "next_offset": nxt},
                             ("topic", "partition"), ("next_offset",))
        return changed

    def _insert(self, table: sa.Table) -> Any:
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        return insert(table)

    def _upsert(self, conn: Connection, table: sa.Table, row: dict[str, Any], keys: tuple[str, ...],
                update: tuple[str, ...]) -> None:
        stmt = self._insert(table).values(**row)
        stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_={c: stmt.excluded[c] for c in update})
        conn.execute(stmt)

    def _put_state(self, conn: Connection, st: dict[str, Any]) -> bool:
        iid = st["instance_id"]
        old = conn.execute(sa.select(instances.c.seq, instances.c.steps, instances.c.started_ms)
                           .where(instances.c.instance_id == iid)).first()
        if old is not None and st["seq"] <= old.seq:
            return False  # redelivered or older: the stored row is at least as new
        internal = st.get("internal") or {}
        search = internal.get("search") or {}
        if not isinstance(search, dict):
            search = {}
        tenant = internal.get("tenant") if isinstance(internal.get("tenant"), str) else search.get("tenant")
        reused = old is not None and old.started_ms != st["started_ms"]  # a new run of a reused id
        previous = orjson.loads(old.steps) if old is not None and not reused else {}
        steps = track_steps(previous, st["status"], internal)
        doc = {"result": st.get("result"), "internal": internal}
        row = {"instance_id": iid, "workflow": st["workflow"], "version": st["version"],
               "kind": internal.get("kind", "spec"), "status": st["status"],
               "tenant": str(tenant) if tenant is not None else None, "seq": st["seq"],
               "started_ms": st["started_ms"], "updated_ms": st["updated_ms"], "closed_ms": st.get("closed_ms"),
               "parent_id": internal.get("parent_id"), "error_type": st.get("error_type"),
               "error_message": st.get("error_message"), "search": _dumps(search), "steps": _dumps(steps),
               "state": _dumps(doc)}
        if old is None:
            conn.execute(instances.insert().values(**row))
        else:
            conn.execute(instances.update().where(instances.c.instance_id == iid).values(**row))
            conn.execute(search_attributes.delete().where(search_attributes.c.instance_id == iid))
        if search:
            rows = [{"instance_id": iid, "name": str(k)[:255], "value": search_text(v)} for k, v in search.items()]
            conn.execute(search_attributes.insert(), rows)
        return True

    def _put_object(self, conn: Connection, st: dict[str, Any]) -> bool:
        key = st["instance_id"]
        old = conn.execute(sa.select(objects.c.seq).where(objects.c.key == key)).first()
        if old is not None and st["seq"] <= old.seq:
            return False
        internal = st.get("internal") or {}
        kind = str(internal.get("kind") or key.split(":", 1)[0])[:16]
        row = {"key": key, "kind": kind, "status": st["status"], "seq": st["seq"], "updated_ms": st["updated_ms"],
               "state": _dumps(internal)}
        if old is None:
            conn.execute(objects.insert().values(**row))
        else:
            conn.execute(objects.update().where(objects.c.key == key).values(**row))
        return True

    def _put_event(self, conn: Connection, ev: Any) -> bool:
        stmt = self._insert(events).values(instance_id=ev.instance_id, seq=ev.seq, type=ev.type, ts=ev.ts,
                                           data=_dumps(ev.data)).on_conflict_do_nothing()
        return bool(conn.execute(stmt).rowcount)

    def _put_definition(self, conn: Connection, d: Any) -> None:
        row = {"name": d.name, "version": d.version, "kind": d.kind, "body": _dumps(d.body),
               "deployed_ms": d.deployed_ms}
        self._upsert(conn, definitions, row, ("name", "version"), ("kind", "body", "deployed_ms"))

    def bulk_insert_instances(self, rows: Iterable[dict[str, Any]], chunk: int = 10_000) -> int:
        """Insert instance rows directly (load tests, imports); ``search`` is a dict per row.

        Returns:
            How many rows were inserted.
        """
        n = 0
        batch: list[dict[str, Any]] = []
        attrs: list[dict[str, Any]] = []

        def flush() -> None:
            with self.engine.begin() as conn:
                conn.execute(instances.insert(), batch)
                if attrs:
                    conn.execute(search_attributes.insert(), attrs)
            batch.clear()
            attrs.clear()

        for row in rows:
            search = row.get("search") or {}
            full = {"kind": "spec", "tenant": None, "seq": 1, "closed_ms": None, "parent_id": None, "error_type": None,
                    "error_message": None, "steps": "{}", "state": "{}", **row, "search": _dumps(search)}
            full["updated_ms"] = row.get("updated_ms", row["started_ms"])
            batch.append(full)
            attrs.extend({"instance_id": row["instance_id"], "name": k, "value": search_text(v)}
                         for k, v in search.items())
            n += 1
            if len(batch) >= chunk:
                flush()
        if batch:
            flush()
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(sa.text("ANALYZE kflow_instances; ANALYZE kflow_search_attributes"))
            else:
                conn.execute(sa.text("ANALYZE"))
        return n

    # -- reading ---------------------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn

    def _where(self, f: InstanceFilter) -> list[Any]:
        c = instances.c
        conds: list[Any] = []
        if f.status:
            conds.append(c.status.in_(f.status))
        if f.workflow:
            conds.append(c.workflow == f.workflow)
        if f.version is not None:
            conds.append(c.version == f.version)
        if f.tenant:
            conds.append(c.tenant == f.tenant)
        if f.started_after is not None:
            conds.append(c.started_ms >= f.started_after)
        if f.started_before is not None:
            conds.append(c.started_ms < f.started_before)
        if f.closed_after is not None:
            conds.append(c.closed_ms >= f.closed_after)
        if f.closed_before is not None:
            conds.append(c.closed_ms < f.closed_before)
        if f.id_prefix:
            conds.append(c.instance_id.startswith(f.id_prefix, autoescape=True))
        for name, value in f.search:
            sa_ = search_attributes.c
            conds.append(c.instance_id.in_(sa.select(sa_.instance_id).where(sa_.name == name, sa_.value == value)))
        return conds

    def list_instances(self, f: InstanceFilter, limit: int = 50, cursor: Optional[str] = None) -> Page:
        """Instances matching ``f``, newest start first, ``limit`` per page.

        Raises:
            FilterError: ``limit`` is out of range or ``cursor`` is malformed.
        """
        if not 1 <= limit <= MAX_PAGE:
            raise FilterError(f"limit must be between 1 and {MAX_PAGE}, but is {limit}")
        c = instances.c
        conds = self._where(f)
        if cursor:
            ms, iid = decode_cursor(cursor)
            conds.append(sa.or_(c.started_ms < ms, sa.and_(c.started_ms == ms, c.instance_id < iid)))
        cols = [c.instance_id, c.workflow, c.version, c.kind, c.status, c.tenant, c.seq, c.started_ms, c.updated_ms,
                c.closed_ms, c.parent_id, c.error_type, c.error_message, c.search]
        q = sa.select(*cols).where(*conds).order_by(c.started_ms.desc(), c.instance_id.desc()).limit(limit + 1)
        with self._read() as conn:
            rows = conn.execute(q).mappings().all()
        items = [dict(r) | {"search": orjson.loads(r["search"])} for r in rows[:limit]]
        nxt = encode_cursor(items[-1]["started_ms"], items[-1]["instance_id"]) if len(rows) > limit else None
        return Page(items, nxt)

    def counts(self, f: InstanceFilter) -> dict[str, int]:
        """Instances per status matching ``f`` (its status filter ignored), every status listed."""
        f2 = InstanceFilter(**{**f.__dict__, "status": []})
        q = sa.select(instances.c.status, sa.func.count()).where(*self._where(f2)).group_by(instances.c.status)
        with self._read() as conn:
            got = {s: n for s, n in conn.execute(q)}
        return {s: got.get(s, 0) for s in STATUSES} | {s: n for s, n in got.items() if s not in STATUSES}

    def get_instance(self, instance_id: str) -> Optional[dict[str, Any]]:
        """The stored row of one instance with its state document decoded, or None."""
        with self._read() as conn:
            row = conn.execute(sa.select(instances).where(instances.c.instance_id == instance_id)).mappings().first()
            if row is None:
                return None
            children = [r.instance_id for r in conn.execute(
                sa.select(instances.c.instance_id).where(instances.c.parent_id == instance_id)
                .order_by(instances.c.started_ms).limit(MAX_PAGE))]
        out = dict(row)
        out["search"] = orjson.loads(out["search"])
        out["steps"] = orjson.loads(out["steps"])
        doc = orjson.loads(out.pop("state"))
        out["result"] = doc.get("result")
        out["internal"] = doc.get("internal") or {}
        out["children_ids"] = children
        return out

    def history(self, instance_id: str, after_seq: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """Events of an instance with ``seq > after_seq``, oldest first."""
        if not 1 <= limit <= MAX_PAGE:
            raise FilterError(f"limit must be between 1 and {MAX_PAGE}, but is {limit}")
        q = (sa.select(events).where(events.c.instance_id == instance_id, events.c.seq > after_seq)
             .order_by(events.c.seq).limit(limit))
        with self._read() as conn:
            return [dict(r) | {"data": orjson.loads(r["data"])} for r in conn.execute(q).mappings()]

    def has_instance(self, instance_id: str) -> bool:
        with self._read() as conn:
            hit = conn.execute(sa.select(instances.c.instance_id).where(instances.c.instance_id == instance_id)).first()
            if hit is not None:
                return True
            q = sa.select(events.c.seq).where(events.c.instance_id == instance_id).limit(1)
            return conn.execute(q).first() is not None

    def definitions(self) -> list[dict[str, Any]]:
        """Every deployed definition: ``{name, versions: [...], latest, kind}`` by name."""
        q = sa.select(definitions.c.name, definitions.c.version, definitions.c.kind, definitions.c.deployed_ms) \
            .order_by(definitions.c.name, definitions.c.version)
        out: dict[str, dict[str, Any]] = {}
        with self._read() as conn:
            for r in conn.execute(q):
                d = out.setdefault(r.name, {"name": r.name, "versions": [], "kind": r.kind})
                d["versions"].append(r.version)
                d["latest"], d["kind"], d["deployed_ms"] = r.version, r.kind, r.deployed_ms
        return list(out.values())

    def definition(self, name: str, version: Optional[int] = None) -> Optional[dict[str, Any]]:
        """One definition (the latest version when ``version`` is None), body decoded, or None."""
        q = sa.select(definitions).where(definitions.c.name == name)
        if version is not None:
            q = q.where(definitions.c.version == version)
        else:
            q = q.order_by(definitions.c.version.desc())
        with self._read() as conn:
            row = conn.execute(q.limit(1)).mappings().first()
        return None if row is None else dict(row) | {"body": orjson.loads(row["body"])}

    def objects(self, kind: str) -> list[dict[str, Any]]:
        """The latest state (the engine's full state document) of every object of ``kind``, by key."""
        q = sa.select(objects.c.state).where(objects.c.kind == kind).order_by(objects.c.key)
        with self._read() as conn:
            return [orjson.loads(r.state) for r in conn.execute(q)]

    def incident_states(self, f: InstanceFilter, limit: int = MAX_PAGE) -> list[dict[str, Any]]:
        """Instances in status INCIDENT matching ``f`` (its status filter ignored), oldest update first:
        the row's summary fields and the engine's state document as ``internal``."""
        c = instances.c
        f2 = InstanceFilter(**{**f.__dict__, "status": ["INCIDENT"]})
        q = (sa.select(c.instance_id, c.workflow, c.version, c.status, c.tenant, c.updated_ms, c.state)
             .where(*self._where(f2)).order_by(c.updated_ms, c.instance_id).limit(limit))
        with self._read() as conn:
            rows = conn.execute(q).mappings().all()
        out = []
        for r in rows:
            doc = orjson.loads(r["state"])
            out.append({k: r[k] for k in ("instance_id", "workflow", "version", "status", "tenant", "updated_ms")}
                       | {"internal": doc.get("internal") or {}})
        return out

    def total(self) -> int:
        with self._read() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(instances)).scalar_one())


def is_object(key: str, state: dict[str, Any]) -> bool:
    """Whether a ``state`` record is of an engine object (schedule, limit counter), not a workflow instance."""
    kind = (state.get("internal") or {}).get("kind")
    return (kind is not None and kind not in INSTANCE_KINDS) or key.startswith(OBJECT_PREFIXES)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """WAL lets the API read while the projection writes; NORMAL sync is durable enough with WAL."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()
