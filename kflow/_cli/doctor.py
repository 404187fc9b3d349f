"""``kflow doctor``: check a cluster and its kflow topics, and say what is wrong and how to fix it.

Checks, in order: the bootstrap servers answer (nothing else is checked when they do not); every
kflow topic exists; the instance-keyed topics (``commands``, ``events``, ``state``, ``dlq``,
``tasks.<queue>``) have the configured partition count and so are co-partitioned; each topic's
``cleanup.policy``; the schema of the newest record of each topic against the ``.avsc`` files of
this kflow; and the engine group's lag on ``commands``. Each check prints OK, WARN or FAIL with a
fix; the exit code is 1 when any check failed.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType
from fastavro import parse_schema
from fastavro.schema import fingerprint, to_parsing_canonical_form
from rich.console import Console
from rich.table import Table

from kflow._cli.common import Bootstrap, Prefix, Verbose, setup_logging
from kflow.model.errors import BrokerUnavailable
from kflow.readend import EndReader, watermarks

__all__ = ["Check", "doctor", "run_checks"]

OK, WARN, FAIL = "OK", "WARN", "FAIL"
_MAGIC = b"\xc3\x01"
_TIMEOUT = 10.0
#: Offsets read back from the high watermark first, and the most ever read back (bounds the work
#: on a partition whose tail is all aborted transactions or control records).
_TAIL_START, _TAIL_MAX = 16, 8192


@dataclass
class Check:
    """One line of the report."""

    name: str
    status: str
    detail: str
    fix: str = ""


def _schema_headers() -> dict[str, bytes]:
    """Message kind -> the single-object header of this kflow's ``.avsc`` file."""
    from kflow import schemas

    out = {}
    for path in sorted(Path(schemas.__file__).parent.glob("*.avsc")):
        parsed = parse_schema(json.loads(path.read_text(encoding="utf-8")))
        out[path.stem] = _MAGIC + bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))
    return out


def _last_records(conf: dict[str, Any], topic: str, partitions: int) -> list[tuple[bytes, list[tuple[str, bytes]]]]:
    """The newest committed record of each non-empty partition of ``topic`` (value, headers).

    The offset below the high watermark is not necessarily a record: on a topic written in
    transactions (``events``, ``state``, ``tasks.*``) it is usually a commit marker, which a
    consumer never sees. So each partition is read from ``high - back`` to its end, and ``back``
    widens (up to :data:`_TAIL_MAX`) for partitions where that window held no record at all.
    """
    with EndReader({**conf, "group.id": f"kflow-doctor-{uuid.uuid4().hex[:8]}"}, timeout=_TIMEOUT) as reader:
        marks = {p: (low, high) for p, (low, high) in reader.watermarks(topic, range(partitions)).items() if high > low}
        last: dict[int, tuple[bytes, list[tuple[str, bytes]]]] = {}
        back, todo = _TAIL_START, set(marks)
        while todo:
            starts = {p: max(marks[p][0], marks[p][1] - back) for p in todo}
            for m in reader.read(topic, start=starts, ends={p: marks[p][1] for p in todo}, timeout=_TIMEOUT):
                last[m.partition()] = (m.value() or b"", m.headers() or [])
            # a partition is done once it gave a record, or the window already reaches its low watermark
            todo = {p for p in todo if p not in last and marks[p][1] - back > marks[p][0]}
            if back >= _TAIL_MAX:
                break
            back *= 8
        return [last[p] for p in sorted(last)]


def _schema_check(conf: dict[str, Any], topic: str, kind: str, partitions: int, headers: dict[str, bytes]) -> Check:
    name = f"schema of {topic}"
    try:
        records = _last_records(conf, topic, partitions)
    except (KafkaException, BrokerUnavailable) as exc:
        return Check(name, WARN, f"could not read the newest records: {exc}")
    if not records:
        return Check(name, OK, "no committed record to compare (an empty topic, or only aborted "
                               f"transactions in its newest {_TAIL_MAX} offsets)")
    expected = headers[kind]
    same = json_count = 0
    problems = []
    for value, hdrs in records:
        if any(k == "content-type" and v == b"application/json" for k, v in hdrs):
            json_count += 1
        elif value[:10] == expected:
            same += 1
        elif value[:1] == b"\x00" and len(value) >= 5:
            problems.append(f"Confluent framing (schema id {int.from_bytes(value[1:5], 'big')})")
        elif value[:2] == _MAGIC:
            other = next((k for k, h in headers.items() if h == value[:10]), None)
            problems.append(f"a {other} record" if other else f"schema fingerprint {value[2:10].hex()}")
        else:
            problems.append("not Avro single-object encoded")
    detail = f"{same} of {len(records)} newest records match {kind}.avsc (fingerprint {expected[2:].hex()})"
    if json_count:
        detail += f", {json_count} JSON"
    if not problems:
        return Check(name, OK, detail)
    return Check(name, WARN, f"{detail}; others: {', '.join(sorted(set(problems)))}",
                 "records written by another kflow version are fine while its schemas stay backward compatible; "
                 "upgrade every process to one version, and check the DLQ (`kflow dlq list`) for foreign records")


def run_checks(conf: dict[str, Any], prefix: str, partitions: int, groups: bool = True,
               connect_timeout: float = _TIMEOUT) -> list[Check]:
    """Run every check against the cluster of ``conf`` (a librdkafka configuration).

    ``connect_timeout`` bounds the wait for the first answer of the bootstrap servers.
    """
    from kflow.streams.topics import TopicNames, TopicSettings, topic_specs

    bootstrap = conf.get("bootstrap.servers", "")
    # librdkafka's own connection-refused lines would bury the report: the check says it once
    admin = AdminClient({**conf, "socket.connection.setup.timeout.ms": 5000, "log_level": 0})
    try:
        metadata = admin.list_topics(timeout=connect_timeout)
    except KafkaException as exc:
        return [Check("broker reachable", FAIL, f"no answer from {bootstrap}: {exc.args[0].str() if exc.args else exc}",
                      "check KFLOW_BOOTSTRAP (host:port the client can reach: the broker's advertised listener), "
                      "the network/firewall, and KFLOW_KAFKA_SECURITY_PROTOCOL / SASL settings for secured clusters")]
    checks = [Check("broker reachable", OK, f"{bootstrap}: {len(metadata.brokers)} broker(s), cluster id "
                                            f"{metadata.cluster_id}")]
    names = TopicNames(prefix)
    # a queue's topics are tasks.<queue> (normal priority) and tasks.<queue>.p<level> (the others)
    queues = sorted({re.sub(r"\.p[1-5]$", "", t[len(prefix) + len("tasks."):])
                     for t in metadata.topics if t.startswith(f"{prefix}tasks.")})
    specs = topic_specs(names, TopicSettings(partitions=partitions), queues)
    present = {s.name: len(metadata.topics[s.name].partitions) for s in specs if s.name in metadata.topics}
    missing = [s.name for s in specs if s.name not in present]
    if missing:
        checks.append(Check("topics exist", WARN, f"missing: {', '.join(missing)}",
                            "the engine creates them at start-up (`kflow engine`); or check KFLOW_TOPIC_PREFIX "
                            f"('{prefix}')"))
    else:
        checks.append(Check("topics exist", OK, f"{len(specs)} topics under '{prefix}' ({len(queues)} task queue(s))"))
    wrong = [f"{s.name} has {present[s.name]}" for s in specs if s.name in present and present[s.name] != s.partitions]
    keyed = sorted({present[s.name] for s in specs if s.name in present and s.partitions == partitions})
    if wrong:
        checks.append(Check("partitions (co-partitioning)", FAIL,
                            f"expected {partitions} partitions (KFLOW_PARTITIONS); " + "; ".join(wrong),
                            "instance-keyed topics must all have the same partition count: recreate the odd topics "
                            "with the right count (or set KFLOW_PARTITIONS to the existing count); never add "
                            "partitions to a live kflow topic, it moves instance keys"))
    elif present:
        checks.append(Check("partitions (co-partitioning)", OK,
                            f"instance-keyed topics all have {keyed[0] if keyed else partitions} partitions; "
                            "definitions has 1"))
    if present:
        resources = [ConfigResource(ResourceType.TOPIC, name) for name in present]
        bad = []
        for resource, future in admin.describe_configs(resources, request_timeout=_TIMEOUT).items():
            spec = next(s for s in specs if s.name == resource.name)
            try:
                entry = future.result(timeout=_TIMEOUT).get("cleanup.policy")
            except KafkaException as exc:
                bad.append(f"{resource.name}: cannot describe ({exc})")
                continue
            actual = {p.strip() for p in (entry.value if entry is not None and entry.value else "").split(",")}
            if actual != {spec.cleanup_policy}:
                bad.append(f"{resource.name} is '{','.join(sorted(actual))}', expected '{spec.cleanup_policy}'")
        if bad:
            checks.append(Check("cleanup.policy", FAIL, "; ".join(bad),
                                "state and definitions must be compacted, the others deleted: "
                                "`kafka-configs.sh --alter --entity-type topics --entity-name TOPIC "
                                "--add-config cleanup.policy=compact` (or delete)"))
        else:
            checks.append(Check("cleanup.policy", OK, "state and definitions compact; the others delete"))
        headers = _schema_headers()
        kinds = [(names.commands, "command"), (names.events, "event"), (names.state, "state"), (names.engine_state, "engine_state"),
                 (names.definitions, "definition")] + [(names.tasks(q), "task") for q in queues]
        for topic, kind in kinds:
            if topic in present:
                checks.append(_schema_check(conf, topic, kind, present[topic], headers))
    if groups and names.commands in present:
        checks.append(_lag_check(admin, conf, names.commands, f"{prefix}engine", present[names.commands]))
    return checks


def _lag_check(admin: AdminClient, conf: dict[str, Any], topic: str, group: str, partitions: int) -> Check:
    name = f"engine group {group}"
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    try:
        future = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group, tps)],
                                                   request_timeout=_TIMEOUT)[group]
        committed = {tp.partition: tp.offset for tp in future.result(timeout=_TIMEOUT).topic_partitions}
    except KafkaException as exc:
        return Check(name, WARN, f"cannot read committed offsets: {exc}")
    consumer = Consumer({**conf, "group.id": f"kflow-doctor-{uuid.uuid4().hex[:8]}"})
    try:
        lag, unowned = 0, 0
        for p, (low, high) in watermarks(consumer, topic, range(partitions), _TIMEOUT).items():
            off = committed.get(p, -1)
            if off < 0:
                unowned += 1
                lag += high - low
            else:
                lag += max(0, high - off)
    finally:
        consumer.close()
    if unowned == partitions:
        return Check(name, WARN, "no committed offsets: no engine has processed commands yet",
                     "start an engine (`kflow engine`) with the same KFLOW_TOPIC_PREFIX")
    return Check(name, OK, f"lag {lag} command(s) across {partitions} partitions")


def doctor(
    partitions: Annotated[Optional[int], typer.Option("--partitions", min=1, envvar="KFLOW_PARTITIONS",
                                                      help="Expected partition count of instance-keyed topics.")] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, metavar="SECONDS",
                                           help="How long to wait for the bootstrap servers.")] = _TIMEOUT,
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Check the cluster and kflow's topics; print what is wrong and how to fix it.

    Checks broker reachability, that every topic exists, partition counts (co-partitioning),
    cleanup policies, the schema of the newest records against this kflow's .avsc files, and the
    engine group's lag. Exits 1 if any check fails.

    Example: kflow doctor --bootstrap kafka:9092 --prefix kflow.
    """
    setup_logging(verbose)
    from kflow.config import KafkaConfig, load_config

    overrides: dict[str, Any] = {k: v for k, v in (("bootstrap", bootstrap), ("topic_prefix", prefix),
                                                   ("partitions", partitions)) if v is not None}
    cfg = load_config(KafkaConfig, **overrides)
    checks = run_checks(cfg.client_conf(), cfg.topic_prefix, cfg.partitions, connect_timeout=timeout)
    table = Table(title=f"kflow doctor: {cfg.bootstrap}, prefix '{cfg.topic_prefix}'", show_lines=False)
    for col in ("check", "status", "detail", "fix"):
        table.add_column(col, overflow="fold")
    colours = {OK: "green", WARN: "yellow", FAIL: "bold red"}
    for c in checks:
        table.add_row(c.name, f"[{colours[c.status]}]{c.status}[/]", c.detail, c.fix)
    Console(width=160).print(table)
    failed = [c for c in checks if c.status == FAIL]
    if failed:
        typer.echo(f"error: {len(failed)} check(s) failed: {', '.join(c.name for c in failed)}", err=True)
        raise typer.Exit(1)
