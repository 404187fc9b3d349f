"""Read kflow's ``state`` and ``events`` topics from a Faust app: record models and their codecs.

kflow writes both topics in Avro single-object encoding (:mod:`kflow.schemas.codec`). This module
turns those values into ``faust.Record`` models — :class:`StateChange` for the ``state`` topic,
:class:`HistoryEvent` for ``events`` — through two Faust codecs registered on import under
:data:`STATE_CODEC` (``"kflow_state"``) and :data:`EVENT_CODEC` (``"kflow_event"``). Each model
names its codec as its serializer, so a topic declared with the model as ``value_type`` decodes
kflow's records with nothing else said::

    import faust
    from kflow.faust import StateChange

    app = faust.App("billing", broker="kafka://localhost:9092")
    states = app.topic("kflow.state", value_type=StateChange)

:class:`StateChange` carries every field of the public state record (docs/state-contract.md);
records of the previous format decode too, with the fields they lack at their defaults. Encoding
goes the other way, so models kept in a Faust table (whose changelog uses the model's serializer)
read back as they were written; only the engine writes kflow's own ``state`` topic. Nothing else
in kflow imports Faust; this module needs the ``faust`` extra.
"""

from collections.abc import Mapping
from typing import Any

try:
    import faust
    from faust.serializers import codecs
except ModuleNotFoundError as exc:  # name the extra to install rather than the missing module
    raise ModuleNotFoundError("kflow.faust needs the faust extra: pip install 'kflow[faust]'",
                              name=exc.name) from exc

from kflow.model.messages import Event, Status
from kflow.schemas.codec import decode_event, decode_state, encode_event, encode_state

__all__ = ["EVENT_CODEC", "STATE_CODEC", "EventCodec", "HistoryEvent", "StateChange", "StateCodec"]

#: Codec name of :class:`StateCodec` in Faust's registry (a topic's ``value_serializer``).
STATE_CODEC = "kflow_state"
#: Codec name of :class:`EventCodec` in Faust's registry.
EVENT_CODEC = "kflow_event"


class StateChange(faust.Record, serializer=STATE_CODEC):
    """The latest state of one workflow instance, as the ``state`` topic carries it.

    The topic is compacted and keyed by instance id; the engine writes one record per instance
    changed by a batch, so a consumer sees every status change but not necessarily every step.
    ``seq`` only grows per instance: a record whose ``seq`` is not above the last one seen for
    its instance is a redelivery.
    """

    #: The instance id (also the record key).
    instance_id: str
    #: The workflow (definition) name.
    workflow: str
    #: The definition version the instance runs.
    version: int
    #: ``RUNNING``, ``BLOCKED``, ``COMPENSATING``, ``CANCELLING`` (open) or ``COMPLETED``,
    #: ``FAILED``, ``CANCELLED``, ``TERMINATED`` (closed, final).
    status: str
    #: Sequence number of the instance's last event (its history is events 1..seq).
    seq: int
    #: When the instance started, epoch ms.
    started_ms: int
    #: When this state was decided, epoch ms.
    updated_ms: int
    #: When the instance closed, epoch ms; None while it is open.
    closed_ms: int | None = None
    #: The workflow's result (any JSON value) once ``COMPLETED``.
    result: Any = None
    #: The error type once ``FAILED`` (or ``CANCELLED``/``TERMINATED`` with a reason).
    error_type: str | None = None
    #: The error message that goes with ``error_type``.
    error_message: str | None = None
    #: The record's format: 2 for this schema, 1 for records written before the field existed.
    format_version: int = 2
    #: ``spec`` or ``code`` for a workflow instance (None in format 1 records).
    kind: str | None = None
    #: The tenant the instance belongs to (the starter's tenant with auth on, else its ``tenant`` search attribute).
    tenant: str | None = None
    #: The principal that started the instance (with auth on).
    owner: str | None = None
    #: The parent instance of a child workflow (``schedule:<id>`` for a scheduled run).
    parent_id: str | None = None
    #: The run number of the instance id (continue-as-new and resets start new runs).
    run: int | None = None
    #: The priority level (1 most urgent .. 5), when one was set.
    priority: int | None = None
    #: The instance's search attributes (a JSON object), None when it has none.
    search_attributes: dict[str, Any] | None = None
    #: The open incidents by incident id (step, activity, error, role, ...), None when there are none.
    incidents: dict[str, Any] | None = None
    #: Where the instance is: ``s:<step id>`` per running step, ``p:<list>:<index>`` per thread.
    position: list[str] | None = None

    @property
    def closed(self) -> bool:
        """True once the instance reached a final status; it never changes again."""
        return self.status in Status.TERMINAL


class HistoryEvent(faust.Record, serializer=EVENT_CODEC):
    """One event of an instance's history, as the ``events`` topic carries it (key = instance id)."""

    #: The event type, e.g. ``WorkflowStarted``, ``ActivityCompleted``, ``WorkflowFailed``.
    type: str
    #: The instance the event belongs to.
    instance_id: str
    #: Gap-free per instance from 1, in the order the engine decided the events.
    seq: int
    #: When the engine decided the event, epoch ms.
    ts: int
    #: The event's fields (payloads such as ``input`` and ``result`` as JSON values); see event.avsc.
    data: dict[str, Any]


_STATE_FIELDS = tuple(StateChange._options.fields)  # noqa: SLF001 (where Faust keeps a model's field names)


class StateCodec(codecs.Codec):
    """Avro single-object ``state`` values <-> the field mapping of a :class:`StateChange`."""

    def _loads(self, s: bytes) -> dict[str, Any]:
        record = decode_state(s)
        return {name: record[name] for name in _STATE_FIELDS}

    def _dumps(self, obj: Mapping[str, Any]) -> bytes:
        return encode_state({name: obj.get(name) for name in _STATE_FIELDS})


class EventCodec(codecs.Codec):
    """Avro single-object ``events`` values <-> the field mapping of a :class:`HistoryEvent`."""

    def _loads(self, s: bytes) -> dict[str, Any]:
        ev = decode_event(s)
        return {"type": ev.type, "instance_id": ev.instance_id, "seq": ev.seq, "ts": ev.ts, "data": ev.data}

    def _dumps(self, obj: Mapping[str, Any]) -> bytes:
        return encode_event(Event(obj["type"], obj["instance_id"], obj["seq"], obj["ts"], dict(obj["data"])))


codecs.register(STATE_CODEC, StateCodec())
codecs.register(EVENT_CODEC, EventCodec())
