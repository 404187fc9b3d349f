"""Create a batch from a visibility query and run it: send, rate-limited, and record each instance's outcome.

A run goes like this::

    load the batch  ->  header RUNNING  ->  follow events, dlq, batches from their end
         |
         v
    for each instance without a final outcome:       (the resume cursor: plan.pending)
        wait for a token (the rate limit), reading outcomes meanwhile
        send the command (id = <batch>:<instance>)
        every N outcomes or second: checkpoint outcomes + header; stop if a cancel was asked
         |
         v
    wait for the outstanding answers (up to the answer timeout each)
         |
         v
    header COMPLETED | INCOMPLETE | CANCELLED        (Ctrl-C: INTERRUPTED; SIGKILL: stays RUNNING)

The outcome of an instance is read from the engine's own output, which this process follows
from the moment before it sends anything: the event that shows the command applied, the
``CommandRejected`` that refused it (with the engine's code and reason), or the dead-lettered
command. On a resume, a rejection of a re-sent cancel, terminate, suspend, resume or retry is
checked against the instance's history: if it holds the batch's own applied event (its reason
names the batch), an earlier run applied it and the outcome is ``applied``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from kflow.batch.log import CHUNK, BatchLog, BatchRecord
from kflow.batch.plan import (
    OPERATIONS,
    Operation,
    Outcome,
    RateLimiter,
    Where,
    WhereError,
    applied_earlier,
    batch_reason,
    command_id,
    match_event,
    pending,
    select,
)
from kflow.clock import Clock, SystemClock
from kflow.config import KafkaConfig
from kflow.model.errors import BrokerUnavailable, KflowError
from kflow.model.messages import Command
from kflow.readend import EndReader, watermarks
from kflow.schemas.codec import decode_command, decode_event, decode_state

if TYPE_CHECKING:
    from kflow.client import Client

__all__ = ["MAX_INSTANCES", "BatchRunner", "OutcomeWatcher", "build_command", "new_batch", "runner_alive",
           "select_from_api", "select_from_state"]

log = logging.getLogger("kflow.batch")

#: Most instances one batch selects unless told otherwise.
MAX_INSTANCES = 100_000
#: A RUNNING batch whose runner is on another host counts as abandoned after this long without a checkpoint.
STALE_MS = 30_000
_PAGE = 1000


# --------------------------------------------------------------------------- creating a batch


def new_batch(log_: BatchLog, operation: str, where: Where, ids: list[str], args: dict[str, Any], rate: float,
              by: str, clock: Clock = SystemClock(), tenant: Optional[str] = None) -> BatchRecord:
    """Record a new batch of ``operation`` over ``ids`` (selected by ``where``) and return it.

    ``by`` and ``tenant`` say who created it (the API lists a tenant's batches to that tenant only).

    Raises:
        WhereError: an unknown operation, a signal without a name, or no instances.
    """
    check_operation(operation, args)
    if not ids:
        raise WhereError(f"no instance matches {where.text()!r}: no batch was created")
    header = {"id": f"b-{uuid.uuid4().hex[:12]}", "operation": operation, "where": where.text(), "args": args,
              "rate": rate, "by": by, "tenant": tenant, "created_ms": clock.now_ms()}
    log_.create(header, ids)
    return log_.load(header["id"])


def check_operation(operation: str, args: dict[str, Any]) -> None:
    """Raise WhereError when ``operation`` or its arguments cannot make a batch."""
    if operation == "migrate":
        from kflow._migration import MigrationPlanError, load_plan

        if not isinstance(args.get("plan"), dict):
            raise WhereError("a migrate batch needs its migration plan (--plan FILE)")
        try:
            load_plan(args["plan"])
        except MigrationPlanError as e:
            raise WhereError(str(e)) from None
    if operation not in OPERATIONS:
        raise WhereError(f"unknown operation {operation!r}: expected one of {', '.join(OPERATIONS)}")
    if operation == "signal" and not args.get("name"):
        raise WhereError("a signal batch needs the signal name (--name)")
    patch = args.get("input_patch")
    if patch is not None and not isinstance(patch, dict):
        raise WhereError(f"input_patch must be a JSON object, but is {type(patch).__name__}")


def build_command(header: dict[str, Any], instance_id: str) -> Command:
    """The command batch ``header`` sends to ``instance_id`` (the same on every run)."""
    bid, op, args = header["id"], OPERATIONS[header["operation"]], header.get("args") or {}
    if op.name == "signal":
        data: dict[str, Any] = {"name": args["name"], "data": args.get("data")}
    elif op.name == "migrate":
        from kflow._migration import load_plan, plan_command

        plan = load_plan(args["plan"])
        return plan_command(plan, instance_id, command_id(bid, instance_id),
                            reason=batch_reason(bid, args.get("reason") or f"migration plan {plan.id}"),
                            by=header.get("by") or "")
    elif op.name == "retry":
        data = {"from_step": args.get("from_step"), "input_patch": args.get("input_patch"),
                "force": bool(args.get("force")), "reason": batch_reason(bid, args.get("reason") or ""),
                "by": header.get("by") or ""}
    else:
        data = {"reason": batch_reason(bid, args.get("reason") or "")}
    return Command(op.command, instance_id, data, command_id=command_id(bid, instance_id))


# --------------------------------------------------------------------------- selecting instances


def select_from_api(api: str, where: Where, limit: int = MAX_INSTANCES,
                    headers: Optional[dict[str, str]] = None, timeout: float = 30.0) -> list[str]:
    """The ids the visibility API lists for ``where``, newest first, every page read once.

    Raises:
        KflowError: the API cannot be reached or refuses the query (its message included).
        WhereError: more than ``limit`` match.
    """
    import httpx

    params = where.api_params()

    def page(cursor: Optional[str]) -> tuple[list[str], Optional[str]]:
        q = {**params, "limit": _PAGE, **({"cursor": cursor} if cursor else {})}
        try:
            res = httpx.get(api.rstrip("/") + "/api/instances", params=q, headers=headers, timeout=timeout)
        except httpx.HTTPError as exc:
            raise KflowError(f"cannot reach the visibility API at {api}: {exc}") from None
        if res.status_code >= 400:
            try:
                message = res.json().get("error", res.text)
            except ValueError:
                message = res.text
            raise KflowError(f"{message} ({res.status_code} from {api})")
        body = res.json()
        return [r["instance_id"] for r in body["items"]], body.get("next_cursor")

    return select(page, limit)


def select_from_state(config: KafkaConfig, where: Where, limit: int = MAX_INSTANCES,
                      timeout: float = 60.0) -> list[str]:
    """The ids whose latest record on the ``state`` topic matches ``where``, newest first (reads the whole topic)."""
    states: dict[str, dict[str, Any]] = {}
    with EndReader(config.consumer_conf(f"kflow-batch-select-{uuid.uuid4().hex}"), timeout=10.0) as reader:
        if not reader.partitions(config.names.state):
            raise KflowError(f"topic '{config.names.state}' does not exist on {config.bootstrap}")
        for msg in reader.read(config.names.state, timeout=timeout, what=f"reading {config.names.state}"):
            if msg.key() is None:
                continue
            if msg.value() is None:
                states.pop(msg.key().decode(), None)
            else:
                st = decode_state(msg.value())
                states[st["instance_id"]] = st
    rows = sorted((s for s in states.values() if where.matches(s)),
                  key=lambda s: (s.get("started_ms") or 0, s["instance_id"]), reverse=True)
    ids = [s["instance_id"] for s in rows]
    return select(lambda _cursor: (ids, None), limit)


# --------------------------------------------------------------------------- following the outcomes


class OutcomeWatcher:
    """Follows ``events``, ``dlq`` and ``batches`` from their high watermarks at construction.

    Positioned before the first command of a run is sent, it sees every answer to the run's
    commands. The high watermarks are asked ``read_uncommitted`` (a ``read_committed`` answer
    can lag behind an engine's open transaction); records are read ``read_committed``.
    """

    def __init__(self, config: KafkaConfig, timeout: float = 10.0) -> None:
        names = config.names
        marks = Consumer(config.consumer_conf(f"kflow-batch-marks-{uuid.uuid4().hex}",
                                              **{"isolation.level": "read_uncommitted"}))
        assignment: list[TopicPartition] = []
        try:
            for topic in (names.events, names.dlq, names.batches):
                meta = marks.list_topics(topic, timeout=timeout).topics.get(topic)
                if meta is None or meta.error is not None or not meta.partitions:
                    raise KflowError(f"topic '{topic}' does not exist on {config.bootstrap}: start an engine "
                                     f"(it creates it) or run `kflow topics ensure --prefix {names.prefix}`")
                for p, (_low, high) in watermarks(marks, topic, meta.partitions, timeout).items():
                    assignment.append(TopicPartition(topic, p, high))
        except KafkaException as exc:
            raise BrokerUnavailable(config.bootstrap, f"cannot read the offsets to follow: {exc}") from None
        finally:
            marks.close()
        self.consumer = Consumer(config.consumer_conf(f"kflow-batch-{uuid.uuid4().hex}"))
        self.consumer.assign(assignment)

    def poll(self, timeout: float) -> list[Message]:
        """The records fetched, waiting at most ``timeout`` seconds for the first one."""
        first = self.consumer.poll(max(timeout, 0.0))
        if first is None:
            return []
        return [first, *self.consumer.consume(500, 0)]

    def close(self) -> None:
        self.consumer.close()


# --------------------------------------------------------------------------- running


def runner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def runner_alive(header: dict[str, Any], now_ms: int, host: Optional[str] = None) -> bool:
    """Whether the process recorded as running a RUNNING batch may still be at it.

    On this host that is whether its pid still exists; on another, whether it checkpointed in
    the last :data:`STALE_MS`.
    """
    if header.get("status") != "RUNNING":
        return False
    where, _, pid = str(header.get("runner") or "").rpartition(":")
    if where == (host or socket.gethostname()) and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return now_ms - int(header.get("updated_ms") or 0) < STALE_MS


Progress = Callable[[BatchRecord], None]


class BatchRunner:
    """Runs (or resumes) one batch through a client, recording its progress on the batches topic.

    Args:
        client: Sends the commands (signed as its principal, when auth is on).
        log: The batches topic.
        answer_timeout: Seconds to wait for the engine's answer to one command before the
            instance's outcome is ``unanswered`` (a resume sends to it again).
        checkpoint_every: Outcomes between checkpoints (also written at least every second).
        max_in_flight: Most commands sent and not answered yet.
        rate: Sends per second; default the batch's own.
        on_progress: Called with the batch after each outcome and checkpoint.
        clock: Time source of the rate limit.
    """

    def __init__(self, client: Client, log_: BatchLog, *, answer_timeout: float = 30.0, checkpoint_every: int = 100,
                 max_in_flight: int = 1000, rate: Optional[float] = None, on_progress: Optional[Progress] = None,
                 clock: Clock = SystemClock()) -> None:
        self.client, self.log = client, log_
        self.answer_timeout, self.checkpoint_every, self.max_in_flight = answer_timeout, checkpoint_every, max_in_flight
        self.rate, self.on_progress, self.clock = rate, on_progress, clock

    def run(self, batch_id: str) -> BatchRecord:
        """Send to every instance of the batch without a final outcome; return the batch as it ended."""
        rec = self.log.load(batch_id)
        if rec.cancel is not None or rec.header.get("status") == "CANCELLED":
            rec.header["status"] = "CANCELLED"
            self.log.checkpoint(rec)
            return rec
        return _Run(self, rec).go()


class _Run:
    """One run of one batch (the state of :meth:`BatchRunner.run`)."""

    def __init__(self, runner: BatchRunner, rec: BatchRecord) -> None:
        self.r, self.rec = runner, rec
        self.op: Operation = OPERATIONS[rec.header["operation"]]
        self.bid = rec.id
        self.resumed = int(rec.header.get("runs") or 0) > 0
        self.index = {iid: i for i, iid in enumerate(rec.ids)}
        self.inflight: dict[str, float] = {}  # instance id -> monotonic deadline of its answer
        self.dirty: set[int] = set()  # chunks with outcomes not checkpointed yet
        self.unsaved = 0
        self.saved_at = time.monotonic()
        self.cancelled = False

    def go(self) -> BatchRecord:
        rec, r = self.rec, self.r
        todo = list(pending(rec.ids, rec.outcomes))
        rec.header.update(status="RUNNING", runs=int(rec.header.get("runs") or 0) + 1, runner=runner_id())
        watcher = OutcomeWatcher(r.client.config)  # positioned before anything is sent
        self.r.log.checkpoint(rec)
        limiter = RateLimiter(r.rate or float(rec.header.get("rate") or 50), r.clock)
        try:
            for i in todo:
                if self.cancelled:
                    break
                while len(self.inflight) >= r.max_in_flight:
                    self._pump(watcher, 0.1)
                while (wait := limiter.delay()) > 0:
                    self._pump(watcher, min(wait, 0.1))  # reading answers is how this waits
                iid = rec.ids[i]
                r.client.send_command(build_command(rec.header, iid), confirm=False)
                self.inflight[iid] = time.monotonic() + r.answer_timeout
                self._pump(watcher, 0)
            r.client.flush()
            while self.inflight:
                self._pump(watcher, 0.1)
        except BaseException:  # Ctrl-C, or a failure: say so, so the batch can be continued at once
            rec.header["status"] = "INTERRUPTED"
            try:
                self._save()
            except Exception:  # the broker may be what failed; the batch then stays RUNNING
                log.warning("cannot record that batch %s was interrupted", self.bid, exc_info=True)
            raise
        finally:
            watcher.close()
        finished = all(o.result in Outcome.FINAL for o in rec.outcomes.values()) and len(rec.outcomes) == len(rec.ids)
        rec.header["status"] = "CANCELLED" if self.cancelled and not finished else (
            "COMPLETED" if finished else "INCOMPLETE")
        rec.header["finished_ms"] = r.clock.now_ms()
        self._save()
        return rec

    def _pump(self, watcher: OutcomeWatcher, timeout: float) -> None:
        """Read what arrived (waiting up to ``timeout``), expire overdue answers, checkpoint when due."""
        for msg in watcher.poll(timeout):
            if msg.error() is None and msg.key() is not None and msg.value() is not None:
                self._take(msg)
        now = time.monotonic()
        for iid in [i for i, deadline in self.inflight.items() if deadline <= now]:
            self._record(iid, Outcome("unanswered", reason=f"no answer from the engine within "
                                                           f"{self.r.answer_timeout:g}s"))
        if self.unsaved >= self.r.checkpoint_every or (now - self.saved_at >= 1.0):
            self._save()

    def _take(self, msg: Message) -> None:
        names = self.r.client.config.names
        key = msg.key().decode("utf-8", "replace")
        if msg.topic() == names.batches:
            if key == f"{self.bid}/cancel":
                self.cancelled = True
            return
        if key not in self.inflight:
            return
        out: Optional[Outcome]
        try:
            if msg.topic() == names.events:
                ev = decode_event(msg.value())
                out = match_event(self.op, self.bid, ev) if ev.instance_id == key else None
            else:
                headers = list(msg.headers() or [])
                cmd = decode_command(msg.value(), headers)
                if cmd.command_id != command_id(self.bid, key):
                    return
                reason = next((v.decode("utf-8", "replace") for k, v in headers if k == "kflow.reason" and v), "")
                out = Outcome("dead-lettered", reason=reason or "dead-lettered by the engine")
        except KflowError:
            return  # not a record this batch wrote or caused
        if out is None:
            return
        if out.result == "rejected" and self.resumed and self.op.name != "signal" and self._applied_before(key):
            out = Outcome("applied", earlier=True)
        self._record(key, out)

    def _applied_before(self, iid: str) -> bool:
        try:
            return applied_earlier(self.op, self.bid, self.r.client.history(iid))
        except (TimeoutError, KflowError) as exc:
            log.warning("cannot read the history of %s to check an earlier run of batch %s: %s", iid, self.bid, exc)
            return False

    def _record(self, iid: str, out: Outcome) -> None:
        self.inflight.pop(iid, None)
        self.rec.outcomes[iid] = out
        self.dirty.add(self.index[iid] // CHUNK)
        self.unsaved += 1
        if self.r.on_progress is not None:
            self.r.on_progress(self.rec)

    def _save(self) -> None:
        self.r.log.checkpoint(self.rec, sorted(self.dirty))
        self.dirty.clear()
        self.unsaved = 0
        self.saved_at = time.monotonic()
        if self.r.on_progress is not None:
            self.r.on_progress(self.rec)
