"""Register kflow's Avro schemas with a Confluent Schema Registry and switch the codec to its framing.

With ``KFLOW_SCHEMA_REGISTRY_URL`` set, each kflow topic's value schema is registered under the
subject ``<topic>-value`` (TopicNameStrategy) with compatibility BACKWARD, when topics are ensured
(engine start-up, ``kflow topics ensure``) and, for the topics a process writes to, when it makes
its first producer. From then on the codec writes Confluent-framed values (``00``, the 4-byte
big-endian schema id, the Avro payload), so ksqlDB, Kafka Connect and Flink read kflow's topics with
their stock Avro deserializers; every reader keeps accepting single-object values too. A schema id
a reader has not seen is fetched from the registry once and remembered.

Registration is all or nothing: every subject is checked first (the schema must read what the
subject's latest version wrote, checked with Avro's reference compatibility checker and, on a real
registry, by the registry itself) and only then registered, so an incompatible schema is one
:class:`SchemaIncompatibleError` naming the topic, subject and reason, with nothing registered
and nothing produced. ``mock://`` URLs give confluent-kafka's in-process registry; one client per
URL is shared by the whole process, so an engine, worker and client in one process see one registry.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kflow.model.errors import DecodeError, KflowError
from kflow.schemas import codec

try:
    from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType
    from avro.schema import parse as _parse_avro
    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
    from confluent_kafka.schema_registry.error import SchemaRegistryError as _ClientError
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the installed extras
    raise ModuleNotFoundError("KFLOW_SCHEMA_REGISTRY_URL needs the registry extra: pip install 'kflow[registry]'",
                              name=exc.name) from exc

__all__ = ["COMPATIBILITY", "PREVIOUS_RELEASE", "CompatibilityLine", "SchemaIncompatibleError",
           "SchemaRegistryUnavailable", "SubjectCheck", "activate", "check_subjects", "client_for",
           "compatibility_report", "ensure_subjects", "previous_schemas", "subject", "topic_kinds"]

#: The compatibility level kflow sets on the subjects it creates.
COMPATIBILITY = "BACKWARD"
_NOT_FOUND = 404
_CONFLICT = 409


class SchemaIncompatibleError(KflowError):
    """The schema of ``topic`` cannot be registered under ``subject``: it is not compatible with the
    latest version there (``reason`` says why). Nothing was registered."""

    def __init__(self, topic: str, subject: str, reason: str) -> None:
        super().__init__(f"topic '{topic}': kflow's schema is incompatible with the latest version of subject "
                         f"'{subject}' ({COMPATIBILITY}: it must read what that version wrote): {reason}; "
                         "nothing was registered or produced")
        self.topic, self.subject, self.reason = topic, subject, reason


class SchemaRegistryUnavailable(KflowError):
    """The registry at ``url`` failed a request (unreachable, refused, or an unexpected answer)."""

    def __init__(self, url: str, doing: str, detail: str) -> None:
        super().__init__(f"Schema Registry {url}: {doing}: {detail}")
        self.url, self.doing, self.detail = url, doing, detail


def subject(topic: str) -> str:
    """The TopicNameStrategy subject of ``topic``'s values."""
    return f"{topic}-value"


def topic_kinds(names: Any, topics: Iterable[str]) -> dict[str, str]:
    """The topics among ``topics`` whose values the codec writes -> their message kind.

    Every topic whose values are Avro written by the codec is in the map: commands, events, state,
    engine-state, definitions, audit and the task topics. The others are not registered, and say why in
    docs/state-contract.md: the values of journal, policies, limits, schedules, batches,
    subscriptions and replies are JSON documents (no Avro schema to register); the DLQ holds the
    original bytes of rejected records, whatever they were.
    """
    fixed = {names.commands: "command", names.events: "event", names.state: "state",
             names.engine_state: "engine_state", names.definitions: "definition", names.audit: "audit"}
    task_prefix = f"{names.prefix}tasks."
    out: dict[str, str] = {}
    for topic in topics:
        if topic in fixed:
            out[topic] = fixed[topic]
        elif topic.startswith(task_prefix):
            out[topic] = "task"
    return out


# --------------------------------------------------------------------------- clients

_clients: dict[str, SchemaRegistryClient] = {}
_registered: dict[str, set[str]] = {}  # url -> subjects this process registered or found in place
_active_kinds: dict[str, set[str]] = {}  # url -> kinds the codec already writes with an id of that registry
_lock = threading.Lock()


def client_for(url: str) -> SchemaRegistryClient:
    """The process's client of the registry at ``url`` (``mock://...``: an in-process registry)."""
    with _lock:
        client = _clients.get(url)
        if client is None:
            client = _clients[url] = SchemaRegistryClient.new_client({"url": url})
        return client


def _is_mock(client: SchemaRegistryClient) -> bool:
    """True for confluent-kafka's in-process registry (``mock://``), which keeps no compatibility config."""
    return type(client).__name__ == "MockSchemaRegistryClient"


# --------------------------------------------------------------------------- checking


@dataclass(frozen=True, slots=True)
class SubjectCheck:
    """What registering one topic's schema would do."""

    topic: str
    subject: str
    kind: str
    schema_id: int | None  # the id when the subject already has exactly this schema
    latest_version: int | None  # the subject's latest version, None for a new subject

    @property
    def action(self) -> str:
        if self.schema_id is not None:
            return f"registered (id {self.schema_id})"
        return "new subject" if self.latest_version is None else f"new version after {self.latest_version}"


def _schema(kind: str) -> Schema:
    return Schema(codec.schema_text(kind), "AVRO")


def incompatibility(reader: str, writer: str) -> str | None:
    """Why schema ``reader`` cannot read what ``writer`` wrote (Avro resolution rules), or None."""
    result = ReaderWriterCompatibilityChecker().get_compatibility(_parse_avro(reader), _parse_avro(writer))
    if result.compatibility is SchemaCompatibilityType.compatible:
        return None
    problems = [f"{kind.value} at {where}" for kind, where in zip(result.incompatibilities, result.locations, strict=False)]
    names = ", ".join(sorted(map(str, result.messages)))
    return "; ".join(problems) + (f" ({names})" if names else "")


def _check(client: SchemaRegistryClient, url: str, topic: str, kind: str) -> SubjectCheck:
    name, schema = subject(topic), _schema(kind)
    try:
        found = client.lookup_schema(name, schema)
        return SubjectCheck(topic, name, kind, found.schema_id, found.version)
    except _ClientError as exc:
        if exc.http_status_code != _NOT_FOUND:
            raise SchemaRegistryUnavailable(url, f"looking up subject '{name}'", str(exc)) from None
    try:
        latest = client.get_latest_version(name)
    except _ClientError as exc:
        if exc.http_status_code != _NOT_FOUND:
            raise SchemaRegistryUnavailable(url, f"reading subject '{name}'", str(exc)) from None
        return SubjectCheck(topic, name, kind, None, None)
    reason = incompatibility(schema.schema_str, latest.schema.schema_str)
    if reason is None and not _is_mock(client):
        try:
            if not client.test_compatibility(name, schema):
                reason = f"the registry refuses it under the subject's compatibility level ({_level(client, name)})"
        except _ClientError as exc:
            raise SchemaRegistryUnavailable(url, f"testing compatibility with subject '{name}'", str(exc)) from None
    if reason is not None:
        raise SchemaIncompatibleError(topic, name, f"against version {latest.version} (id {latest.schema_id}): {reason}")
    return SubjectCheck(topic, name, kind, None, latest.version)


def _level(client: SchemaRegistryClient, name: str) -> str:
    try:
        return str(client.get_compatibility(name))
    except _ClientError:
        return "unknown"


def check_subjects(url: str, topics: Mapping[str, str]) -> list[SubjectCheck]:
    """Check every ``topic -> kind`` against the registry without registering anything.

    Raises:
        SchemaIncompatibleError: a subject's latest version is incompatible (the first one found).
        SchemaRegistryUnavailable: the registry failed a request.
    """
    client = client_for(url)
    try:
        return [_check(client, url, topic, kind) for topic, kind in topics.items()]
    except (OSError, ValueError) as exc:  # transport errors of the HTTP client, bad URLs
        raise SchemaRegistryUnavailable(url, "checking subjects", f"{type(exc).__name__}: {exc}") from None


# --------------------------------------------------------------------------- release check

#: The ``.avsc`` files of the previous release, shipped with kflow (``kflow schemas check`` reads them).
PREVIOUS_RELEASE = Path(__file__).with_name("previous")


def previous_schemas(folder: Path = PREVIOUS_RELEASE) -> dict[str, str]:
    """Message kind -> schema text of the previous release's ``.avsc`` files in ``folder`` (kinds
    new in this release have none)."""
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.avsc")) if p.stem in codec.KINDS}


@dataclass(frozen=True, slots=True)
class CompatibilityLine:
    """Whether one topic's current schema reads what an earlier one wrote (``problem`` None: it does)."""

    topic: str
    subject: str
    against: str  # "registry version N (id I)", "previous release", or what there was nothing to check against
    problem: str | None
    checked: bool = True  # False when there was nothing to compare with (a new subject, a new kind)

    def text(self) -> str:
        if self.problem is not None:
            return f"INCOMPATIBLE {self.subject}: against {self.against}: {self.problem}"
        if not self.checked:
            return f"new          {self.subject}: {self.against}"
        return f"ok           {self.subject}: BACKWARD compatible with {self.against}"


def compatibility_report(url: str | None, topics: Mapping[str, str],
                         previous: Mapping[str, str]) -> list[CompatibilityLine]:
    """Check each ``topic -> kind``'s current schema against the latest version registered under its
    subject (with ``url``) and against ``previous`` (kind -> the previous release's schema text).
    Registers nothing.

    Raises:
        SchemaRegistryUnavailable: the registry failed a request.
    """
    out: list[CompatibilityLine] = []
    client = client_for(url) if url else None
    for topic, kind in topics.items():
        name, current = subject(topic), codec.schema_text(kind)
        if client is not None:
            try:
                latest = client.get_latest_version(name)
            except _ClientError as exc:
                if exc.http_status_code != _NOT_FOUND:
                    raise SchemaRegistryUnavailable(url or "", f"reading subject '{name}'", str(exc)) from None
                out.append(CompatibilityLine(topic, name, "the registry: no version registered yet", None, False))
            except (OSError, ValueError) as exc:
                raise SchemaRegistryUnavailable(url or "", f"reading subject '{name}'",
                                                f"{type(exc).__name__}: {exc}") from None
            else:
                where = f"registry version {latest.version} (id {latest.schema_id})"
                out.append(CompatibilityLine(topic, name, where, _reason(current, latest.schema.schema_str)))
        if kind in previous:
            out.append(CompatibilityLine(topic, name, "the previous release", _reason(current, previous[kind])))
        else:
            out.append(CompatibilityLine(topic, name, f"the previous release had no {kind} schema", None, False))
    return out


def _reason(reader: str, writer: str) -> str | None:
    try:
        return incompatibility(reader, writer)
    except Exception as exc:  # a schema the Avro parser refuses is a problem to report, not a crash
        return f"unreadable schema: {type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------- registering


def ensure_subjects(url: str, topics: Mapping[str, str]) -> dict[str, int]:
    """Register each ``topic -> kind``'s schema under ``<topic>-value``; return topic -> schema id.

    Every subject is checked before any is registered, so a failure registers nothing. Subjects
    kflow creates get compatibility BACKWARD; an existing subject keeps the level it has.
    """
    checks = check_subjects(url, topics)
    client = client_for(url)
    ids: dict[str, int] = {}
    for check in checks:
        if check.schema_id is not None:
            ids[check.topic] = check.schema_id
            continue
        try:
            if check.latest_version is None and not _is_mock(client):  # the mock keeps no per-subject config
                client.set_compatibility(check.subject, COMPATIBILITY)
            ids[check.topic] = client.register_schema(check.subject, _schema(check.kind))
        except _ClientError as exc:
            if exc.http_status_code == _CONFLICT:
                raise SchemaIncompatibleError(check.topic, check.subject, exc.error_message) from None
            raise SchemaRegistryUnavailable(url, f"registering subject '{check.subject}'", str(exc)) from None
        except (OSError, ValueError) as exc:
            raise SchemaRegistryUnavailable(url, f"registering subject '{check.subject}'",
                                            f"{type(exc).__name__}: {exc}") from None
    return ids


def activate(url: str, names: Any, topics: Iterable[str] = ()) -> None:
    """Register the subjects of kflow's own topics under ``names`` and of ``topics`` (task topics),
    then make this process write Confluent-framed values. Subjects already handled are skipped, so
    calling it again is cheap."""
    base = [names.commands, names.events, names.state, names.engine_state, names.definitions, names.audit,
            names.tasks("default")]
    wanted = topic_kinds(names, [*base, *topics])
    with _lock:
        done = _registered.setdefault(url, set())
        todo = {t: k for t, k in wanted.items() if subject(t) not in done}
    if not todo:
        return
    ids = ensure_subjects(url, todo)
    with _lock:
        done.update(subject(t) for t in ids)
    first: dict[str, int] = {}
    for topic, schema_id in ids.items():
        first.setdefault(todo[topic], schema_id)
        codec.known_schema_id(schema_id, todo[topic], None)
    codec.use_registry({k: v for k, v in first.items() if k not in _active_kinds.get(url, set())},
                       lambda schema_id: _resolve(url, schema_id))
    _active_kinds.setdefault(url, set()).update(first)


def reset() -> None:
    """Forget every registry client and registered subject, and go back to single-object values."""
    with _lock:
        _clients.clear()
        _registered.clear()
        _active_kinds.clear()
    codec.use_single_object()


_KIND_BY_NAME = {json.loads(codec.schema_text(k))["namespace"] + "." + json.loads(codec.schema_text(k))["name"]: k
                 for k in codec.KINDS}


def _resolve(url: str, schema_id: int) -> tuple[str, str]:
    """Kind and schema text of registry id ``schema_id`` (a reader met it first); DecodeError if it is
    unknown or not a version of a kflow schema."""
    try:
        schema = client_for(url).get_schema(schema_id)
    except _ClientError as exc:
        if exc.http_status_code == _NOT_FOUND:
            raise DecodeError(f"unknown Schema Registry id {schema_id}: the registry at {url} does not have it") from None
        raise SchemaRegistryUnavailable(url, f"fetching schema id {schema_id}", str(exc)) from None
    except (OSError, ValueError) as exc:
        raise SchemaRegistryUnavailable(url, f"fetching schema id {schema_id}", f"{type(exc).__name__}: {exc}") from None
    if (schema.schema_type or "AVRO") != "AVRO":
        raise DecodeError(f"Schema Registry id {schema_id} is a {schema.schema_type} schema, not a kflow Avro schema")
    try:
        raw = json.loads(schema.schema_str)
        full = raw["name"] if "." in raw["name"] else f"{raw.get('namespace', '')}.{raw['name']}"
    except (ValueError, TypeError, KeyError):
        raise DecodeError(f"Schema Registry id {schema_id} is not an Avro record schema") from None
    kind = _KIND_BY_NAME.get(full)
    if kind is None:
        raise DecodeError(f"Schema Registry id {schema_id} is the schema of {full!r}, not one of kflow's "
                          f"({', '.join(sorted(_KIND_BY_NAME))})")
    return kind, schema.schema_str
