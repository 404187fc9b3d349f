"""An SLA watchdog over kflow's ``state`` topic, written as a Faust app.

It keeps a table of the open instances (key = instance id, co-partitioned with the ``state``
topic), serves the number of open instances per workflow from it, and sends one alert record to
the alerts topic when an instance has been open longer than its workflow's SLA. Overdue instances
are found on each state change (measured by the record's own ``updated_ms``, so reading old
records raises no false alarms) and by a timer that sweeps the open instances against the wall
clock, so an instance that sits waiting for a signal, and writes no record meanwhile, is caught.

Data flow::

    kflow.state ──track──> open-instances table ──count by workflow──> GET /open/
        │                        │
        └─ overdue ─> sla-alerts <─ overdue ── sweep (timer)

Every change to the table sets or deletes one instance's entry, so a state record delivered
twice (Faust delivers at least once) changes nothing; the counts are computed from the table for
the same reason, rather than kept as a running total that a redelivered ``+1`` would skew. Run it
with ``python examples/faust_sla/app.py worker -l info`` (settings in README.md beside this file).
"""

import time
from collections import Counter
from typing import Any

import faust
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kflow.config import KafkaConfig
from kflow.dev.broker import DEV_CONSUMER_TUNING
from kflow.faust import StateChange
from kflow.model.spec import parse_duration_ms


class SlaConfig(BaseSettings):
    """What the watchdog watches for; every field is an environment variable ``KFLOW_SLA_<NAME>``."""

    # defaults are in ms already; only values from the environment are durations to parse
    model_config = SettingsConfigDict(env_prefix="KFLOW_SLA_", extra="ignore", validate_default=False)

    app_id: str = Field("kflow-sla", description="Faust app id: consumer group and prefix of its own topics.")
    by_workflow: dict[str, int] = Field(
        default_factory=dict, description='SLA per workflow name, JSON: {"order": "15m", "refund": "2h"}.')
    default: int | None = Field(None, description="SLA of workflows not in by_workflow; unset: not watched.")
    alerts_topic: str = Field("sla-alerts", description="Where alert records go (key = instance id, JSON).")
    check_every: int = Field(5000, description="How often the timer sweeps the open instances.")
    web_host: str = Field("127.0.0.1", description="Interface of the web server that serves GET /open/.")
    web_port: int = Field(6066, description="Port of that web server.")

    @field_validator("by_workflow", mode="before")
    @classmethod
    def _durations(cls, value: Any) -> Any:
        return {k: parse_duration_ms(v) for k, v in value.items()} if isinstance(value, dict) else value

    @field_validator("default", "check_every", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return None if value is None else parse_duration_ms(value)

    def sla_ms(self, workflow: str) -> int | None:
        """The SLA of ``workflow`` in ms, or None if its instances are not watched."""
        return self.by_workflow.get(workflow, self.default)


class OpenInstance(faust.Record, serializer="json"):
    """An instance the watchdog has seen open and not yet closed."""

    workflow: str
    started_ms: int
    #: True once its alert was sent: one alert per instance.
    alerted: bool = False


class SlaAlert(faust.Record, serializer="json", include_metadata=False):
    """The record sent to the alerts topic (plain JSON, so any consumer reads it)."""

    instance_id: str
    workflow: str
    started_ms: int
    sla_ms: int
    #: How long the instance had been open when the breach was seen.
    open_ms: int
    #: When the breach was seen, epoch ms (the record's time, or the wall clock for the timer).
    detected_ms: int
    #: ``state`` (a state change showed it) or ``timer`` (the sweep found it).
    source: str


def overdue(inst: OpenInstance, sla_ms: int | None, now_ms: int) -> bool:
    """True if ``inst`` has no alert yet and was open longer than ``sla_ms`` at ``now_ms``."""
    return sla_ms is not None and not inst.alerted and now_ms - inst.started_ms > sla_ms


def track_step(before: OpenInstance | None, change: StateChange,
               sla_ms: int | None) -> tuple[OpenInstance | None, bool]:
    """Fold one state change into an instance's entry: (entry after, alert now).

    The entry depends only on the entry before and the record, so a record seen twice leaves it
    as it was; a closed instance has no entry.
    """
    if change.closed:
        return None, False
    inst = before or OpenInstance(workflow=change.workflow, started_ms=change.started_ms)
    if overdue(inst, sla_ms, change.updated_ms):
        return inst.derive(alerted=True), True
    return inst, False


def alert(instance_id: str, inst: OpenInstance, sla_ms: int, now_ms: int, source: str) -> SlaAlert:
    """The alert record for ``inst``, seen overdue at ``now_ms`` by ``source``."""
    return SlaAlert(instance_id=instance_id, workflow=inst.workflow, started_ms=inst.started_ms, sla_ms=sla_ms,
                    open_ms=now_ms - inst.started_ms, detected_ms=now_ms, source=source)


def create_app(kafka: KafkaConfig, sla: SlaConfig) -> faust.App:
    """The watchdog as a Faust app over the kflow topics ``kafka`` names."""
    tuning: dict[str, Any] = {}
    if kafka.dev_tuning:  # dev brokers: join a group in seconds, not tens of seconds
        tuning = {"broker_session_timeout": DEV_CONSUMER_TUNING["session.timeout.ms"] / 1000,
                  "broker_heartbeat_interval": DEV_CONSUMER_TUNING["heartbeat.interval.ms"] / 1000}
    app = faust.App(
        sla.app_id,
        broker=[f"kafka://{server}" for server in kafka.bootstrap.split(",")],
        store="memory://",
        # the table's changelog is keyed by instance id like the state topic; with the same
        # partition count each of its keys sits on the partition number of the state records
        topic_partitions=kafka.partitions,
        # the sweep reads the whole local table: a standby copy would make two workers alert
        table_standby_replicas=0,
        consumer_auto_offset_reset="earliest",
        web_bind=sla.web_host, web_host=sla.web_host, web_port=sla.web_port,
        **tuning,
    )
    states = app.topic(kafka.names.state, key_type=str, value_type=StateChange)
    alerts = app.topic(sla.alerts_topic, key_type=str, value_type=SlaAlert)
    # use_partitioner: the timer changes entries too, outside any stream event
    open_instances = app.Table("open-instances", key_type=str, value_type=OpenInstance, use_partitioner=True)

    @app.agent(states)
    async def track(changes: faust.StreamT[StateChange]) -> None:
        async for change in changes:
            iid, sla_ms = change.instance_id, sla.sla_ms(change.workflow)
            before = open_instances.get(iid)
            after, breached = track_step(before, change, sla_ms)
            # read and write with no await between, so the sweep never interleaves
            if after is None and before is not None:
                del open_instances[iid]
            elif after is not None and after != before:
                open_instances[iid] = after
            if breached and after is not None and sla_ms is not None:
                await alerts.send(key=iid, value=alert(iid, after, sla_ms, change.updated_ms, "state"))

    @app.timer(interval=sla.check_every / 1000)
    async def sweep() -> None:
        now = int(time.time() * 1000)
        for iid in [iid for iid, inst in open_instances.items() if overdue(inst, sla.sla_ms(inst.workflow), now)]:
            inst = open_instances.get(iid)  # again: the agent may have closed it during an await below
            sla_ms = sla.sla_ms(inst.workflow) if inst is not None else None
            if inst is None or sla_ms is None or not overdue(inst, sla_ms, now):
                continue
            open_instances[iid] = inst.derive(alerted=True)
            await alerts.send(key=iid, value=alert(iid, inst, sla_ms, now, "timer"))

    @app.page("/open/")
    async def open_counts(web: Any, request: Any) -> Any:
        """Open instances per workflow in the partitions this worker holds; 503 until its table is read back."""
        if app.rebalancing or not app.tables.recovery.completed.is_set():
            return web.json({"error": "recovering its table"}, status=503)
        return web.json(dict(Counter(inst.workflow for inst in open_instances.values())))

    return app


app = create_app(KafkaConfig(), SlaConfig())

if __name__ == "__main__":
    app.main()
