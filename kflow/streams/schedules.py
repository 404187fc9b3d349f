"""The schedules table: read the compacted ``<prefix>schedules`` topic, and the commands that change it.

Only engines write the topic: the engine that owns a schedule's key (``schedule:<id>`` on
``commands``) produces the schedule's record in the transaction of every decision that changed it,
and a tombstone when it is deleted. Everyone else (the client, ``kflow schedule list|describe``, the
visibility API) reads it to its end as a table. Changes go to the engine as commands
(:func:`schedule_commands`), validated here first so a bad declaration is one error and nothing is
sent.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any, Union

import orjson
from confluent_kafka import Message

from kflow.config import KafkaConfig
from kflow.engine.schedules import ScheduleSpec, backfill_times, iso, key_of, next_runs
from kflow.model.messages import Command
from kflow.readend import EndReader

__all__ = ["backfill_command", "read_schedules", "with_next_runs"]

log = logging.getLogger("kflow.schedules")


def _fold(table: dict[str, dict[str, Any]], msg: Message) -> None:
    key = (msg.key() or b"").decode("utf-8", "replace")
    value = msg.value()
    if value is None:
        table.pop(key, None)
        return
    try:
        table[key] = orjson.loads(value)
    except orjson.JSONDecodeError:
        log.warning("schedules: ignoring the undecodable record of '%s' at offset %d", key, msg.offset())


def read_schedules(config: KafkaConfig, timeout: float = 15.0) -> dict[str, dict[str, Any]]:
    """Every schedule on the table now, by id (empty when the topic does not exist yet).

    Raises:
        BrokerUnavailable: the topic could not be read within ``timeout``.
    """
    table: dict[str, dict[str, Any]] = {}
    topic = config.names.schedules
    # The engine writes this table in its transactions, one every time a schedule fires: the end
    # is the high watermark (asked read_uncommitted), not the last stable offset a read_committed
    # look-up returns, which an open transaction holds back (and the embedded broker can report
    # below records already committed). The records are still read read_committed.
    with EndReader(config.consumer_conf("kflow-schedules-ends", **{"isolation.level": "read_uncommitted"}),
                   timeout=min(timeout, 10)) as ends_reader:
        parts = ends_reader.partitions(topic)
        if not parts:
            return table
        ends = {p: high for p, (_low, high) in ends_reader.watermarks(topic, parts).items()}
    with EndReader(config.consumer_conf("kflow-schedules-reader"), timeout=min(timeout, 10)) as reader:
        for msg in reader.read(topic, ends=ends, timeout=timeout, what="reading the schedules"):
            _fold(table, msg)
    return table


def with_next_runs(record: dict[str, Any], now_ms: int, n: int = 5) -> dict[str, Any]:
    """``record`` with ``next_runs``: the next ``n`` scheduled times (UTC ISO), none while paused."""
    spec = ScheduleSpec.from_dict(dict(record["spec"]))
    upcoming = [] if record.get("paused") else next_runs(spec, now_ms, n)
    return {**record, "next_runs": [iso(t) for t in upcoming]}


def backfill_command(record: dict[str, Any], start: Union[str, datetime], end: Union[str, datetime]) -> Command:
    """The ``BackfillSchedule`` command for ``[start, end)``, checked against the schedule first.

    Raises:
        ValueError: the range is not a pair of instants with the end after the start, or holds
            more runs than one backfill may start.
    """
    spec = ScheduleSpec.from_dict(dict(record["spec"]))
    probe = ScheduleSpec.build(spec.id, spec.workflow, every="1s", start=start, end=end)  # parses both instants
    assert probe.start_ms is not None and probe.end_ms is not None
    if probe.end_ms <= probe.start_ms:
        raise ValueError(f"expected an end after the start, but got [{iso(probe.start_ms)}, {iso(probe.end_ms)})")
    backfill_times(spec, probe.start_ms, probe.end_ms)
    return Command("BackfillSchedule", key_of(spec.id), {"start_ms": probe.start_ms, "end_ms": probe.end_ms})


