"""The pure parts of a batch: the ``--where`` query, the operations, command ids, rate limit and resume cursor.

Nothing here touches Kafka or HTTP, so each rule is unit-tested on its own. A batch applies one
operation to every instance a visibility query selected when the batch was created; the command
for instance ``i`` of batch ``b`` always carries the command id ``b:i`` (:func:`command_id`), which
is what lets a resumed batch re-send a command whose fate a crash hid: the engine recognises the
re-sent signal as a redelivery, and a re-sent cancel, terminate, suspend, resume or retry finds
the instance already changed and is rejected, so no instance is acted on twice.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Optional

from kflow.clock import Clock
from kflow.engine.search import search_text
from kflow.model.messages import Event
from kflow.model.versions import version_code

__all__ = ["OPERATIONS", "Operation", "Outcome", "RateLimiter", "Where", "WhereError", "applied_earlier", "batch_reason",
           "command_id", "match_event", "parse_rate", "parse_where", "pending", "select"]


class WhereError(ValueError):
    """A ``--where`` query (or another batch argument) is malformed; the message says where and why."""


# --------------------------------------------------------------------------- operations


@dataclass(frozen=True, slots=True)
class Operation:
    """One batch operation: the command it sends and the events that show the engine applied it."""

    name: str
    command: str
    applied: frozenset[str]


#: Batch operations by name; each is the single-instance operation of the same name.
OPERATIONS: Mapping[str, Operation] = {op.name: op for op in (
    Operation("signal", "SignalWorkflow", frozenset({"SignalReceived"})),
    Operation("cancel", "CancelWorkflow", frozenset({"CancelRequested", "WorkflowCancelled"})),
    Operation("terminate", "TerminateWorkflow", frozenset({"WorkflowTerminated"})),
    Operation("suspend", "SuspendWorkflow", frozenset({"WorkflowSuspended"})),
    Operation("resume", "ResumeWorkflow", frozenset({"WorkflowResumed"})),
    Operation("retry", "RetryWorkflow", frozenset({"WorkflowRetried"})),
    Operation("migrate", "MigrateWorkflow", frozenset({"WorkflowMigrated", "MigrationDeferred"})),
)}


def command_id(batch_id: str, instance_id: str) -> str:
    """The id of the command batch ``batch_id`` sends to ``instance_id``: the same on every run of the batch."""
    return f"{batch_id}:{instance_id}"


def batch_reason(batch_id: str, reason: str) -> str:
    """The reason recorded in the history of each instance a batch acts on: it names the batch."""
    return f"batch {batch_id}: {reason}" if reason else f"batch {batch_id}"


# --------------------------------------------------------------------------- outcomes


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one instance: ``applied``, ``rejected``, ``dead-lettered`` or ``unanswered``.

    ``code`` and ``reason`` are the engine's (``CommandRejected`` code and reason, or the DLQ
    reason); ``earlier`` is True when an earlier run of the batch applied it (seen on a resume).
    """

    result: str
    code: str = ""
    reason: str = ""
    earlier: bool = False

    #: Results that settle an instance: a resumed batch does not send to it again.
    FINAL = ("applied", "rejected", "dead-lettered")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"result": self.result}
        if self.code:
            out["code"] = self.code
        if self.reason:
            out["reason"] = self.reason
        if self.earlier:
            out["earlier"] = True
        return out

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Outcome:
        return cls(str(doc["result"]), str(doc.get("code") or ""), str(doc.get("reason") or ""),
                   bool(doc.get("earlier")))


def match_event(op: Operation, batch_id: str, ev: Event) -> Optional[Outcome]:
    """The outcome ``ev`` (an event of an instance the batch sent to) reports, or None if it is not about it.

    A signal is matched exactly, by its ``signal_id`` (the command id). The other operations are
    matched by event type after the command was sent: the applied event carrying the batch's
    reason, or a ``CommandRejected`` of the operation's command type (another client sending the
    same command type to the same instance at the same moment could be mistaken for the batch).
    A signal the engine rejects as ``DUPLICATE`` was applied by an earlier run of the batch.
    """
    cid = command_id(batch_id, ev.instance_id)
    if ev.type in op.applied:
        if op.name == "signal":
            return Outcome("applied") if ev.data.get("signal_id") == cid else None
        reason = str(ev.data.get("reason") or "")
        ours = reason == f"batch {batch_id}" or reason.startswith(f"batch {batch_id}: ")
        if ours and ev.type == "MigrationDeferred":  # accepted; the engine moves it at the next safe point
            return Outcome("applied", reason=f"deferred until this ends: {ev.data.get('waiting_on', '')}")
        return Outcome("applied") if ours else None
    if ev.type == "CommandRejected" and ev.data.get("command_type") == op.command:
        code, reason = str(ev.data.get("code") or ""), str(ev.data.get("reason") or "")
        if op.name == "signal" and code == "DUPLICATE" and f"'{cid}'" in reason:
            return Outcome("applied", earlier=True)
        return Outcome("rejected", code, reason)
    return None


def applied_earlier(op: Operation, batch_id: str, history: Iterable[Event]) -> bool:
    """Whether an instance's history shows the batch's own command applied (used on a resume)."""
    return any(match_event(op, batch_id, ev) == Outcome("applied") for ev in history)


# --------------------------------------------------------------------------- resume


def pending(ids: Sequence[str], outcomes: Mapping[str, Outcome]) -> Iterator[int]:
    """Indices of the selected instances still to send to, in order: those without a final outcome.

    After an interruption they include every instance the crashed run may have sent to without
    recording what became of it; re-sending to those is harmless (see the module docstring).
    """
    for i, iid in enumerate(ids):
        got = outcomes.get(iid)
        if got is None or got.result not in Outcome.FINAL:
            yield i


# --------------------------------------------------------------------------- rate limit


class RateLimiter:
    """A token bucket: ``rate`` sends per second on average, at most ``burst`` at once.

    Args:
        rate: Tokens added per second (> 0).
        clock: The time source (:class:`~kflow.clock.ManualClock` in tests).
        burst: Bucket size; default one second's worth, at least 1.
    """

    def __init__(self, rate: float, clock: Clock, burst: Optional[float] = None) -> None:
        if rate <= 0:
            raise WhereError(f"expected a rate above 0 per second, but got {rate:g}")
        self.rate = rate
        self.burst = max(1.0, burst if burst is not None else rate)
        self._clock = clock
        self._tokens = 1.0  # the first send goes at once; the bucket fills from there
        self._at = clock.now_ms()

    def delay(self) -> float:
        """Take a token if one is there (0.0), else the seconds until one will be (nothing taken)."""
        now = self._clock.now_ms()
        self._tokens = min(self.burst, self._tokens + max(now - self._at, 0) / 1000 * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate

    def acquire(self, sleep: Callable[[float], None]) -> None:
        """Wait (with ``sleep``) until a token is available and take it."""
        while (wait := self.delay()) > 0:
            sleep(wait)


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|sec|second|m|min|minute))?\s*$", re.IGNORECASE)


def parse_rate(text: str) -> float:
    """Sends per second from ``50``, ``50/s`` or ``600/m``.

    Raises:
        WhereError: anything else, or a rate of 0.
    """
    m = _RATE.match(text or "")
    if m is None or float(m.group(1)) <= 0:
        raise WhereError(f"expected a rate like 50/s or 600/m, but got {text!r}")
    per_minute = (m.group(2) or "s").lower().startswith("m")
    return float(m.group(1)) / (60.0 if per_minute else 1.0)


# --------------------------------------------------------------------------- the --where query

#: Statuses a query may name.
STATUSES = ("RUNNING", "BLOCKED", "COMPENSATING", "CANCELLING", "SUSPENDED", "INCIDENT", "COMPLETED", "FAILED",
            "CANCELLED", "TERMINATED")
_TIME_FIELDS = ("started_after", "started_before", "closed_after", "closed_before")
_FIELDS = ("status", "workflow", "version", "tenant", *_TIME_FIELDS, "id_prefix")
_TERM = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_.-]*)\s*=\s*(?P<value>.*)$", re.DOTALL)


@dataclass(frozen=True)
class Where:
    """A parsed ``--where`` query: every given field must match (AND), as in ``kflow list``."""

    status: tuple[str, ...] = ()
    workflow: Optional[str] = None
    version: Optional[int] = None
    tenant: Optional[str] = None
    started_after: Optional[int] = None
    started_before: Optional[int] = None
    closed_after: Optional[int] = None
    closed_before: Optional[int] = None
    id_prefix: Optional[str] = None
    search: tuple[tuple[str, str], ...] = field(default=())

    def api_params(self) -> dict[str, Any]:
        """The query parameters of the visibility API's ``GET /api/instances`` that select the same instances."""
        params: dict[str, Any] = {}
        if self.status:
            params["status"] = ",".join(self.status)
        for name in ("workflow", "version", "tenant", *_TIME_FIELDS, "id_prefix"):
            value = getattr(self, name)
            if value is not None:
                params[name] = value
        if self.search:
            params["search"] = [f"{n}:{v}" for n, v in self.search]
        return params

    def matches(self, state: Mapping[str, Any]) -> bool:
        """Whether a state record (as on the ``state`` topic) is selected; the rule the store applies."""
        attrs = state.get("search_attributes") or {}
        tenant = state.get("tenant") or attrs.get("tenant")
        started, closed = state.get("started_ms"), state.get("closed_ms")
        checks = (
            not self.status or state.get("status") in self.status,
            self.workflow is None or state.get("workflow") == self.workflow,
            self.version is None or state.get("version") == self.version,
            self.tenant is None or tenant == self.tenant,
            self.started_after is None or (started is not None and started >= self.started_after),
            self.started_before is None or (started is not None and started < self.started_before),
            self.closed_after is None or (closed is not None and closed >= self.closed_after),
            self.closed_before is None or (closed is not None and closed < self.closed_before),
            self.id_prefix is None or str(state.get("instance_id", "")).startswith(self.id_prefix),
        )
        return all(checks) and all(n in attrs and search_text(attrs[n]) == v for n, v in self.search)

    def text(self) -> str:
        """The query in canonical ``--where`` form (what the batch records)."""
        parts = []
        for name, value in self.api_params().items():
            if name == "search":
                parts += [f"search.{s.partition(':')[0]}={_quote(s.partition(':')[2])}" for s in value]
            elif name in _TIME_FIELDS:
                iso = datetime.fromtimestamp(value / 1000, UTC).isoformat(timespec="milliseconds")
                parts.append(f"{name}={iso.replace('+00:00', 'Z')}")
            else:
                parts.append(f"{name}={_quote(str(value))}")
        return " AND ".join(parts)


def _quote(value: str) -> str:
    """``value`` as a query value: bare when it can be, else quoted."""
    if value and re.fullmatch(r"[^\s'\"]+", value):
        return value
    return f'"{value}"' if "'" in value else f"'{value}'"


def _epoch_ms(value: str, name: str) -> int:
    if value.lstrip("-").isdigit():
        return int(value)
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise WhereError(f"{name} must be epoch milliseconds or an ISO 8601 time like 2024-05-01T12:00:00Z, "
                         f"but got {value!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


#: One token of a query: ``AND``, or ``NAME=VALUE`` with the value bare or in single or double quotes.
_TOKEN = re.compile(r"""\s*(?:(?P<and>AND)(?=\s|$)
                          |(?P<name>[A-Za-z_][\w.-]*)\s*=\s*(?P<value>'[^']*'|"[^"]*"|[^\s'"]+))""",
                    re.IGNORECASE | re.VERBOSE)


def _terms(query: str) -> list[tuple[str, str]]:
    """``(name, value)`` per term of ``query``, quotes removed; terms alternate with ``AND``."""
    terms: list[tuple[str, str]] = []
    pos, want_term = 0, True
    text = query.rstrip()
    if not text.strip():
        raise WhereError("the query is empty: give at least one NAME=VALUE term, e.g. status=RUNNING")
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or (m.group("and") is not None) == want_term:
            rest = text[pos:].lstrip()
            what = "NAME=VALUE" if want_term else "AND between terms"
            at = len(text) - len(rest) + 1
            raise WhereError(f"expected {what} at position {at} of the query, but got {rest[:30]!r}")
        if m.group("name") is not None:
            value = m.group("value")
            if value[:1] in "'\"" and len(value) >= 2:
                value = value[1:-1]
            terms.append((m.group("name"), value))
        want_term = not want_term
        pos = m.end()
    if want_term:
        raise WhereError("expected NAME=VALUE after the last AND of the query")
    return terms


def parse_where(query: str) -> Where:
    """Parse a ``--where`` query: ``NAME=VALUE`` terms joined by ``AND``.

    Names: ``status`` (one or comma-separated), ``workflow``, ``version``, ``tenant``,
    ``started_after``, ``started_before``, ``closed_after``, ``closed_before`` (epoch ms or ISO
    8601), ``id_prefix``, and ``search.NAME`` for a search attribute. Values with spaces are
    quoted (``'...'`` or ``"..."``).

    Example: ``status=RUNNING AND workflow=order AND search.customer='ACME Corp'``

    Raises:
        WhereError: one message naming the first problem (an unknown name, a bad status, version
            or time, a term given twice); nothing is selected from a query that does not parse.
    """
    values: dict[str, Any] = {}
    search: list[tuple[str, str]] = []
    for name, value in _terms(query):
        if name.startswith("search."):
            attr = name[len("search."):]
            if not attr:
                raise WhereError("expected search.NAME=VALUE with a search attribute name, but the name is empty")
            search.append((attr, value))
            continue
        if name not in _FIELDS:
            raise WhereError(f"unknown field {name!r}: expected one of {', '.join(_FIELDS)}, "
                             "or search.NAME for a search attribute")
        if name in values:
            raise WhereError(f"{name} is given twice (for several statuses write status=RUNNING,FAILED)")
        if not value:
            raise WhereError(f"{name} has no value")
        if name == "status":
            statuses = tuple(s.strip().upper() for s in value.split(",") if s.strip())
            bad = [s for s in statuses if s not in STATUSES]
            if bad or not statuses:
                raise WhereError(f"unknown status {', '.join(bad) or value!r}: expected one of {', '.join(STATUSES)}")
            values[name] = statuses
        elif name == "version":
            if value.count(".") == 2:  # a semantic version: matched by its version code
                try:
                    values[name] = version_code(value)
                except ValueError as e:
                    raise WhereError(f"version: {e}") from None
                continue
            if not value.isdigit() or int(value) < 1:
                raise WhereError(f"version must be a whole number from 1, but got {value!r}")
            values[name] = int(value)
        elif name in _TIME_FIELDS:
            values[name] = _epoch_ms(value, name)
        else:
            values[name] = value
    return Where(**values, search=tuple(search))


# --------------------------------------------------------------------------- selection


def select(page: Callable[[Optional[str]], tuple[list[str], Optional[str]]], limit: int) -> list[str]:
    """Every instance id a paged source returns, in its order, without repeats.

    ``page(cursor)`` returns one page of ids and the cursor of the next (None on the last).

    Raises:
        WhereError: more than ``limit`` instances match (a batch that large is refused whole).
    """
    seen: dict[str, None] = {}
    cursor: Optional[str] = None
    while True:
        ids, cursor = page(cursor)
        seen.update(dict.fromkeys(ids))
        if len(seen) > limit:
            raise WhereError(f"the query matches more than {limit} instances: narrow it, or raise --max "
                             "(nothing was sent)")
        if cursor is None:
            return list(seen)
