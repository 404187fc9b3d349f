"""The durable record of batches: the compacted ``batches`` topic, read as a table.

One batch is several records, all JSON, on the topic's single partition:

- ``<id>``: the header: the definition (operation, query, arguments, rate, who, when), the
  status, the counts per outcome, how many runs it took, and which process runs it;
- ``<id>/ids/<n>``: chunk ``n`` of the selected instance ids, written once, before any command is sent,
  so every run of the batch works on the same instances;
- ``<id>/out/<n>``: the outcomes recorded so far for chunk ``n`` (instance id -> outcome), rewritten at
  each checkpoint that changed it;
- ``<id>/cancel``: a request to stop the batch (who, when).

Compaction keeps the latest value of each key, so the table is the batch's current state. A
header is written after the chunks it counts, on the same partition, so a reader that sees a
header sees its chunks too.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import orjson
from confluent_kafka import KafkaError, Message, Producer

from kflow.batch.plan import Outcome
from kflow.config import KafkaConfig
from kflow.model.errors import BrokerUnavailable, KflowError
from kflow.readend import EndReader

__all__ = ["CHUNK", "BatchLog", "BatchNotFound", "BatchRecord", "STATUSES"]

#: Instance ids per ``ids`` / ``out`` record (a chunk of outcomes stays well under 1 MB).
CHUNK = 500
#: Batch statuses: created (nothing sent yet), running, interrupted (stopped before the end; resume
#: it), completed (every instance has a final outcome), incomplete (the run ended with instances the
#: engine did not answer for; resume sends to them again), cancelled.
STATUSES = ("CREATED", "RUNNING", "INTERRUPTED", "COMPLETED", "INCOMPLETE", "CANCELLED")


class BatchNotFound(KflowError):
    """No batch with this id on the batches topic."""

    def __init__(self, batch_id: str) -> None:
        super().__init__(f"no batch with id {batch_id!r} (kflow batch list shows them)")
        self.batch_id = batch_id


@dataclass
class BatchRecord:
    """A batch as the topic holds it: its header fields, its instances and their outcomes."""

    header: dict[str, Any]
    ids: list[str] = field(default_factory=list)
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    cancel: Optional[dict[str, Any]] = None

    @property
    def id(self) -> str:
        return str(self.header["id"])

    def counts(self) -> dict[str, int]:
        """Instances per outcome, and ``pending`` for those without a final one."""
        out = {r: 0 for r in (*Outcome.FINAL, "unanswered")}
        for o in self.outcomes.values():
            out[o.result] = out.get(o.result, 0) + 1
        out["pending"] = len(self.ids) - sum(1 for o in self.outcomes.values() if o.result in Outcome.FINAL)
        return out


def _key(batch_id: str, part: str = "", n: Optional[int] = None) -> bytes:
    return (batch_id + (f"/{part}" if part else "") + (f"/{n}" if n is not None else "")).encode()


class BatchLog:
    """Reads and writes the ``batches`` topic.

    Args:
        config: Connection settings and topic names.
        timeout: Seconds allowed for a delivery or a read of the whole topic.
    """

    def __init__(self, config: KafkaConfig, timeout: float = 30.0) -> None:
        self.config = config
        self.topic = config.names.batches
        self.timeout = timeout
        self._producer: Optional[Producer] = None

    # -- writing --------------------------------------------------------------------------------

    def _produce(self, records: Sequence[tuple[bytes, Optional[bytes]]]) -> None:
        """Write ``records`` in order and wait until every one is acknowledged."""
        if self._producer is None:
            self._producer = Producer(self.config.producer_conf(**{"acks": "all", "client.id": "kflow-batch",
                                                                    "message.timeout.ms": int(self.timeout * 1000)}))
        errors: list[KafkaError] = []

        def delivered(err: Optional[KafkaError], _msg: Message) -> None:
            if err is not None:
                errors.append(err)

        for key, value in records:
            while True:
                try:
                    self._producer.produce(self.topic, value, key, partition=0, on_delivery=delivered)
                    break
                except BufferError:
                    self._producer.poll(0.1)
        left = self._producer.flush(self.timeout)
        if left:
            raise BrokerUnavailable(self.config.bootstrap, f"{left} batch record(s) not acknowledged within "
                                                           f"{self.timeout:g}s")
        if errors:
            raise KflowError(f"writing to {self.topic} failed: {errors[0].str()}")

    def create(self, header: dict[str, Any], ids: Sequence[str]) -> None:
        """Write a new batch: its instance chunks, then its header (status ``CREATED``)."""
        chunks = [list(ids[i:i + CHUNK]) for i in range(0, len(ids), CHUNK)]
        header = {**header, "total": len(ids), "chunks": len(chunks), "status": "CREATED", "runs": 0,
                  "counts": {}, "updated_ms": int(time.time() * 1000)}
        self._produce([*((_key(header["id"], "ids", n), orjson.dumps({"ids": c})) for n, c in enumerate(chunks)),
                       (_key(header["id"]), orjson.dumps(header))])

    def checkpoint(self, record: BatchRecord, chunks: Sequence[int] = ()) -> None:
        """Write the outcomes of ``chunks`` (indices), then the header with its counts."""
        by_chunk: dict[int, dict[str, Any]] = {}
        for n in chunks:
            part = record.ids[n * CHUNK:(n + 1) * CHUNK]
            by_chunk[n] = {iid: record.outcomes[iid].to_json() for iid in part if iid in record.outcomes}
        record.header["counts"] = record.counts()
        record.header["updated_ms"] = int(time.time() * 1000)
        self._produce([*((_key(record.id, "out", n), orjson.dumps(v)) for n, v in sorted(by_chunk.items())),
                       (_key(record.id), orjson.dumps(record.header))])

    def request_cancel(self, batch_id: str, by: str) -> None:
        """Ask the process running ``batch_id`` to stop sending (it stops at its next checkpoint)."""
        self._produce([(_key(batch_id, "cancel"), orjson.dumps({"by": by, "at_ms": int(time.time() * 1000)}))])

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(self.timeout)
            self._producer = None

    # -- reading --------------------------------------------------------------------------------

    def _table(self) -> dict[str, Any]:
        """Key -> latest decoded value of the whole topic (a tombstone removes the key)."""
        table: dict[str, Any] = {}
        conf = self.config.consumer_conf(f"kflow-batch-read-{uuid.uuid4().hex}")
        with EndReader(conf, timeout=min(self.timeout, 10.0)) as reader:
            if not reader.partitions(self.topic):
                raise KflowError(f"topic '{self.topic}' does not exist on {self.config.bootstrap}: start an engine "
                                 f"(it creates it) or run `kflow topics ensure --prefix {self.config.names.prefix}`")
            for msg in reader.read(self.topic, timeout=self.timeout, what=f"reading {self.topic}"):
                key = msg.key()
                if key is None:
                    continue
                value = msg.value()
                if value is None:
                    table.pop(key.decode(), None)
                else:
                    table[key.decode()] = orjson.loads(value)
        return table

    def headers(self) -> list[dict[str, Any]]:
        """The header of every batch, newest first."""
        found = [v for k, v in self._table().items() if "/" not in k]
        return sorted(found, key=lambda h: (h.get("created_ms", 0), h["id"]), reverse=True)

    def load(self, batch_id: str) -> BatchRecord:
        """A batch with its instances and recorded outcomes.

        Raises:
            BatchNotFound: there is none with this id.
        """
        return self.record_of(self._table(), batch_id)

    @staticmethod
    def record_of(table: Mapping[str, Any], batch_id: str) -> BatchRecord:
        header = table.get(batch_id)
        if header is None:
            raise BatchNotFound(batch_id)
        ids: list[str] = []
        outcomes: dict[str, Outcome] = {}
        for n in range(int(header.get("chunks", 0))):
            ids += table.get(f"{batch_id}/ids/{n}", {}).get("ids", [])
            outcomes.update({k: Outcome.from_json(v) for k, v in table.get(f"{batch_id}/out/{n}", {}).items()})
        if len(ids) != header.get("total"):
            raise KflowError(f"batch {batch_id!r} is incomplete on the batches topic: expected {header.get('total')} "
                             f"instance ids, but found {len(ids)}")
        return BatchRecord(dict(header), ids, outcomes, table.get(f"{batch_id}/cancel"))
