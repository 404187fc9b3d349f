"""The engine's gate for commands read from Kafka: who sent each one, whether they may, and the audit record.

With auth on, the processor asks a :class:`CommandGuard` about every command it reads from the
``commands`` topic, before ``decide``:

* a workflow command (start, signal, query, status, cancel, terminate, and the engine's own
  ``FireTimer`` / ``CompleteChild`` / ``FailChild``) needs a command token in its
  :data:`~kflow.security.tokens.COMMAND_HEADER` header that verifies, has not expired, matches the
  record's key and value and was not used before; the policy in force must then allow its
  principal the command's operation on the instance (owner and tenant from the instance's state)
  or, for a start, on the workflow's definition;
* an activity report (``CompleteActivity``, ``FailActivity``, ``HeartbeatActivity``,
  ``StartActivity``) needs the attempt token of its (instance, activity, attempt) in
  :data:`~kflow.security.tokens.ATTEMPT_HEADER` instead: the capability the engine put on the task.

The engine's own commands (a child's start, a parent's ``FailChild``, a deferred local activity's
start) pass the same gate: the engine signs them with its HS256 secret as ``system:engine`` (role
``system_admin``) on behalf of the instance's owner, so a header copied onto a forged record proves
nothing (its digest binds the record). Their tokens live as long as a command may wait in the
topic, so that no engine command ever expires unread, and their ids are not remembered: a replayed
engine command is the byte-identical record, which the engine's own deduplication rejects
(``DUPLICATE`` or ``INVALID_STATE``: a child started twice, a child result for a child no longer
pending, a cancel of a closed instance).

Everyone else's token ids are remembered until they expire, across restarts, in the transaction of
their commands. A token binds its record's key, so it can only ever be replayed on the instance it
was signed for: when the command's decision writes that instance's state, which the transaction
does anyway, the id goes into the state (:data:`SEEN_STATE_KEY`, at most :data:`SEEN_PER_STATE`
unexpired ids, pruned as it is written) and costs no record of its own; otherwise (a query, a
command refused without an instance, an instance holding many live ids) into the partition's
:class:`SeenTokens`, written as changelog records. A command is checked against both. Nothing here
touches Kafka.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import orjson

from kflow.model.messages import Command, JSONDict, RejectCode
from kflow.security.audit import AuditOutcome, AuditRecord, encode_audit_fields
from kflow.security.policy import Policy, Resource, Verdict, evaluate
from kflow.security.principal import DEFAULT_TENANT, SYSTEM_ADMIN, AuthError, Principal
from kflow.security.tokens import (
    KeyConfigError,
    Keys,
    ReplayCache,
    attempt_token,
    check_attempt_token,
    check_progress_token,
    replayed,
    sign_command,
    verify_command_claims,
)

__all__ = ["AUDIT_PARTITION", "ENGINE_PRINCIPAL", "MUTATING", "REPORTS", "SEEN_KEY_PREFIX", "SEEN_PER_STATE",
           "SEEN_STATE_KEY", "Check", "CommandGuard", "SeenTokens"]

log = logging.getLogger("kflow.security")

#: The principal the engine signs its own commands as.
ENGINE_PRINCIPAL = "system:engine"
#: Activity reports: checked by their attempt token, not by a principal's.
REPORTS: Mapping[str, str] = {"CompleteActivity": "complete_activity", "FailActivity": "fail_activity",
                              "HeartbeatActivity": "heartbeat_activity", "StartActivity": "start_activity"}
#: Commands that change an instance on a user's request: each one granted is audited.
MUTATING = frozenset({"StartWorkflow", "SignalWorkflow", "UpdateWorkflow", "CancelWorkflow", "TerminateWorkflow",
                      "SuspendWorkflow", "ResumeWorkflow", "RetryWorkflow", "ResolveIncident", "MigrateWorkflow",
                      "SetPriority"})
#: Command type -> (the action audit records name, the operation the policy is asked about).
#: ``FireTimer``, ``CompleteChild`` and ``FailChild`` are the engine's own: ``system:Admin``.
_OPERATIONS: Mapping[str, tuple[str, str]] = {
    "StartWorkflow": ("start", "start"), "SignalWorkflow": ("signal", "signal"), "QueryWorkflow": ("query", "query"),
    "UpdateWorkflow": ("update", "signal"),  # an update is a signal that answers: the same permission
    "QueryStatus": ("status", "status"), "CancelWorkflow": ("cancel", "cancel"),
    "TerminateWorkflow": ("terminate", "terminate"), "SuspendWorkflow": ("suspend", "suspend"),
    "ResumeWorkflow": ("resume", "resume"),
    "SetPriority": ("set_priority", "suspend"),  # changes how its work is scheduled: instance:Manage, like suspend
    "RetryWorkflow": ("retry", "retry"), "FireTimer": ("fire_timer", "system:Admin"),
    "CompleteChild": ("complete_child", "system:Admin"), "FailChild": ("fail_child", "system:Admin"),
    # an incident whose step names a role needs that role instead (see CommandGuard.authorize)
    "ResolveIncident": ("resolve_incident", "instance:Manage"),
    "MigrateWorkflow": ("migrate", "instance:Manage"),  # moves an instance to another version of its workflow
}
_ENGINE_RESOURCE = "engine"
#: The rule that allows an activity report (its attempt's token; no audit record names it).
_ATTEMPT_RULE = "the token of the attempt it reports on"
_PROGRESS_RULE = "the progress token of the attempt it reports on"
#: Reports that need only an attempt's progress token (or the attempt token): they do not end the attempt.
_PROGRESS_REPORTS = frozenset({"StartActivity", "HeartbeatActivity"})
#: The ``audit`` partition the engine writes its records to, whichever commands partitions a
#: transaction decides: each partition a transaction writes costs every commit (one more partition
#: to add and one more commit marker), so the audit trail adds one, not one per commands partition.
#: The records of one instance are still in one partition, in the order their decisions committed.
AUDIT_PARTITION = 0
#: Most verdicts :meth:`CommandGuard.authorize` keeps (anyone may send commands naming new instances).
_VERDICTS_KEPT = 4096

#: Changelog key prefix of the records that keep a partition's accepted token ids (on the journal
#: changelog, beside the journal's own records: those start with an instance id, UTF-8, which never
#: contains the byte 0xff).
SEEN_KEY_PREFIX = b"\xffkflow.seen\x00"
#: Most token ids in one record (about 40 bytes each), so a record stays far below message.max.bytes.
SEEN_PER_RECORD = 10_000
#: State key of the token ids an instance accepted: ``{jti: exp}`` (the same name as
#: ``kflow.engine.core.SEEN_TOKENS``, which carries it over when a run starts afresh under the same id).
SEEN_STATE_KEY = "seen_tokens"
#: Most unexpired token ids kept in one instance's state (about 40 bytes each); more go to the
#: partition's :class:`SeenTokens` records.
SEEN_PER_STATE = 32


def _tenant(state: Optional[JSONDict]) -> str:
    return str(state.get("tenant") or DEFAULT_TENANT) if state is not None else DEFAULT_TENANT


def _owner(state: Optional[JSONDict]) -> Optional[str]:
    return state.get("owner") if state is not None else None


def _incident_role(cmd: Command, state: Optional[JSONDict]) -> Optional[str]:
    """The role an open incident's step names, for a ``ResolveIncident`` of it; else None."""
    if cmd.type != "ResolveIncident" or state is None:
        return None
    inc = (state.get("incidents") or {}).get(cmd.data.get("incident_id"))
    return (inc.get("role") or None) if isinstance(inc, dict) else None


@dataclass(frozen=True, slots=True)
class Check:
    """The gate's answer for one command.

    Attributes:
        action: What the audit trail calls the operation (``start``, ``cancel``, ``complete_activity`` ...).
        resource: What it acts on.
        principal: Who sent it; None when no valid token named anyone (or for an activity report).
        code: None when allowed; else :attr:`RejectCode.UNAUTHENTICATED` or :attr:`RejectCode.FORBIDDEN`.
        reason: The rule that allowed it, or why it was refused ("expected ..., but ...").
        jti: The id of the verified command token, when a check with ``defer`` left remembering it
            to :meth:`CommandGuard.remember`; else None.
        exp: That token's expiry (epoch seconds).
    """

    action: str
    resource: Resource
    principal: Optional[Principal]
    code: Optional[str]
    reason: str
    jti: Optional[str] = None
    exp: float = 0.0

    @property
    def allowed(self) -> bool:
        return self.code is None


class CommandGuard:
    """Authenticates and authorizes the commands one engine reads; signs the ones it produces.

    Args:
        keys: The keys command tokens are verified with; ``keys.secret`` (``KFLOW_JWT_SECRET``)
            also makes attempt tokens and signs the engine's own commands.
        policy: Returns the policy in force (the ``policies`` table; read per command, so a new
            policy counts from the next command).
        engine_ttl_s: Lifetime of the engine's own command tokens: as long as a command may wait
            in the topic (its retention), since the engine's commands must never expire unread.

    Raises:
        KeyConfigError: ``keys`` has no HS256 secret.
    """

    def __init__(self, keys: Keys, policy: Callable[[], Policy], engine_ttl_s: float) -> None:
        if keys.secret is None:
            raise KeyConfigError("KFLOW_AUTH is on: the engine needs KFLOW_JWT_SECRET (it makes attempt tokens "
                                 "and signs its own commands with it)")
        self.keys, self._policy, self.engine_ttl_s = keys, policy, engine_ttl_s
        self._secret: bytes = keys.secret
        self._engine_keys = Keys(secret=keys.secret)
        # verdicts of the policy in force, by (principal, operation, resource): evaluate is pure, and
        # most commands repeat one (a service starting one workflow), so each is worked out once
        self._verdicts: dict[tuple[Principal, str, Resource], Verdict] = {}
        self._verdicts_of: Optional[Policy] = None

    # -- checking -----------------------------------------------------------------------------
    def check(self, cmd: Command, state: Optional[JSONDict], token: str | bytes | None, attempt: str | bytes | None,
              key: Optional[bytes], value: Optional[bytes], now_s: float, seen: ReplayCache, *,
              defer: bool = False) -> Check:
        """Authenticate and authorize ``cmd``, read as the record (``key``, ``value``) with these headers.

        A command token whose id ``state`` (:data:`SEEN_STATE_KEY`) or ``seen`` holds is a replay.

        Args:
            cmd: The decoded command.
            state: The addressed instance's state, or None.
            token: The :data:`COMMAND_HEADER` header's value, if any.
            attempt: The :data:`ATTEMPT_HEADER` header's value, if any (activity reports).
            key: The record's key, as read.
            value: The record's value, as read.
            now_s: The engine's clock, in epoch seconds.
            seen: The partition's token ids: a verified token's id is added (pending until commit),
                unless it is the engine's own.
            defer: Do not add the id to ``seen``: the answer carries it (:attr:`Check.jti`) for
                :meth:`remember`, once the caller knows whether the decision writes the state.
        """
        if cmd.type in REPORTS:
            return self._check_report(cmd, state, attempt)
        action, _ = self._operation(cmd)
        jti: Optional[str] = None
        try:
            who, jti, exp = verify_command_claims(token, key, value, self.keys, now_s)
            if who.name == ENGINE_PRINCIPAL:
                jti = None
            else:
                held = state.get(SEEN_STATE_KEY) if state is not None else None
                if held and held.get(jti, 0) > now_s:
                    raise replayed(jti)
                if defer:
                    seen.check(jti, exp, now_s)
                else:
                    seen.add(jti, exp, now_s)
                    jti = None
        except AuthError as e:
            return Check(action, self._resource(cmd, state, None), None, RejectCode.UNAUTHENTICATED, e.reason)
        got = self.authorize(who, cmd, state)
        return got if jti is None else Check(got.action, got.resource, got.principal, got.code, got.reason, jti, exp)

    @staticmethod
    def remember(check: Check, state: Optional[JSONDict], seen: ReplayCache, now_s: float) -> None:
        """Remember the token id of a command checked with ``defer``, whatever its verdict.

        Args:
            check: The check's answer (nothing to remember without :attr:`Check.jti`).
            state: The instance's state as this command's decision writes it, in this transaction;
                None when it writes none. The id goes in there (unexpired ids kept, at most
                :data:`SEEN_PER_STATE`); else into ``seen``, pending until the transaction commits.
            seen: The partition's token ids.
            now_s: The engine's clock, in epoch seconds.
        """
        if check.jti is None:
            return
        if state is not None:
            held = state.get(SEEN_STATE_KEY)
            kept = {j: e for j, e in held.items() if e > now_s} if held else {}
            if len(kept) < SEEN_PER_STATE:
                kept[check.jti] = check.exp
                state[SEEN_STATE_KEY] = kept  # a new dict: the state before this decision is not changed
                return
        seen.add(check.jti, check.exp, now_s)

    def authorize(self, who: Principal, cmd: Command, state: Optional[JSONDict]) -> Check:
        """Whether the policy in force allows ``who`` the operation of ``cmd`` (already authenticated)."""
        action, operation = self._operation(cmd)
        resource = self._resource(cmd, state, who)
        role = _incident_role(cmd, state)
        if role is not None:
            return Check(action, resource, who, *self._role_verdict(who, role, resource))
        policy = self._policy()
        if policy is not self._verdicts_of:  # a new policy: every earlier verdict is void
            self._verdicts, self._verdicts_of = {}, policy
        key = (who, operation, resource)
        verdict = self._verdicts.get(key)
        if verdict is None:
            verdict = evaluate(policy, who, operation, resource)
            if len(self._verdicts) >= _VERDICTS_KEPT:
                self._verdicts.clear()
            self._verdicts[key] = verdict
        return Check(action, resource, who, None if verdict.allowed else RejectCode.FORBIDDEN, verdict.reason)

    def _role_verdict(self, who: Principal, role: str, resource: Resource) -> tuple[Optional[str], str]:
        """``(code, reason)`` for resolving an incident of a step that names ``role``: that role in the
        instance's tenant, or ``system_admin``; owning the instance or other grants do not count."""
        roles = self._policy().roles_of(who)
        if SYSTEM_ADMIN in roles:
            return None, f"role {SYSTEM_ADMIN!r} allows everything"
        if role in roles and who.tenant == resource.tenant:
            return None, f"role {role!r} resolves the incident"
        where = "" if who.tenant == resource.tenant else f" in tenant {resource.tenant!r}"
        return (RejectCode.FORBIDDEN, f"expected role {role!r} (named by the incident's step) or {SYSTEM_ADMIN!r} to "
                f"resolve incidents of {resource.id!r}{where}, but {who.name!r} of tenant {who.tenant!r} has "
                f"{', '.join(sorted(roles)) or 'no roles'}")

    def _check_report(self, cmd: Command, state: Optional[JSONDict], given: str | bytes | None) -> Check:
        """A result needs its attempt's token; a start or heartbeat report that token or its progress
        token (:func:`~kflow.security.tokens.progress_token`), which does not let its reader forge a result."""
        data = cmd.data
        aid, n = str(data.get("activity_id")), data.get("attempt")
        resource = Resource("activity", aid, _tenant(state), _owner(state))
        progress = cmd.type in _PROGRESS_REPORTS
        check = check_progress_token if progress else check_attempt_token
        if isinstance(n, int) and check(self._secret, cmd.instance_id, aid, n, given):
            return Check(REPORTS[cmd.type], resource, None, None, _PROGRESS_RULE if progress else _ATTEMPT_RULE)
        what = f"attempt {n} of activity '{aid}' of '{cmd.instance_id}'"
        if not given:
            why = "there is none"
        elif progress:
            why = "it is not that attempt's (another attempt's, or forged)"
        else:
            why = "it is not that attempt's (another attempt's, its progress token, or forged)"
        token = "token or progress token" if progress else "token"
        return Check(REPORTS[cmd.type], resource, None, RejectCode.UNAUTHENTICATED,
                     f"expected the {token} of {what} in header 'kflow.attempt', but {why}")

    @staticmethod
    def _operation(cmd: Command) -> tuple[str, str]:
        return _OPERATIONS.get(cmd.type, (cmd.type, "system:Admin"))

    @staticmethod
    def _resource(cmd: Command, state: Optional[JSONDict], who: Optional[Principal]) -> Resource:
        """What ``cmd`` acts on. An instance that does not exist (yet) is in the sender's tenant."""
        tenant = _tenant(state) if state is not None or who is None else who.tenant
        if cmd.type == "StartWorkflow":
            return Resource("definition", str(cmd.data.get("workflow") or ""), tenant)
        if _OPERATIONS.get(cmd.type, ("", "system:Admin"))[1] == "system:Admin":
            return Resource("system", _ENGINE_RESOURCE, tenant)
        return Resource("instance", cmd.instance_id, tenant, _owner(state))

    def starter(self, who: Principal) -> tuple[str, str]:
        """``(owner, tenant)`` of an instance ``who`` starts: itself, or whom a system_admin acts for."""
        if who.on_behalf_of and SYSTEM_ADMIN in self._policy().roles_of(who):
            return who.on_behalf_of, who.tenant
        return who.name, who.tenant

    # -- what the engine produces -------------------------------------------------------------
    def attempt_token(self, instance_id: str, activity_id: str, attempt: int) -> str:
        """The capability token of one activity attempt (put on its task)."""
        return attempt_token(self._secret, instance_id, activity_id, attempt)

    def sign(self, key: bytes, value: bytes, state: Optional[JSONDict], now_s: float) -> bytes:
        """The command token of a command the engine produces on behalf of instance ``state``."""
        who = Principal(ENGINE_PRINCIPAL, _tenant(state), frozenset({SYSTEM_ADMIN}), _owner(state))
        return sign_command(key, value, who, self._engine_keys, self.engine_ttl_s, now=now_s).encode("ascii")

    @staticmethod
    def audit(check: Check, cmd: Command, outcome: AuditOutcome, now_ms: int, ref: str,
              details: Optional[dict[str, Any]] = None) -> AuditRecord:
        """The audit record of ``check`` on ``cmd`` (record ``ref``: ``topic[partition]@offset``)."""
        return AuditRecord.model_validate(_audit_fields(check, cmd, outcome, now_ms, ref, details))

    @staticmethod
    def audit_value(check: Check, cmd: Command, outcome: AuditOutcome, now_ms: int, ref: str,
                    details: Optional[dict[str, Any]] = None) -> bytes:
        """:meth:`audit`'s record, encoded (the bytes :func:`~kflow.security.audit.encode_audit` makes of
        it), without building the model: what the engine produces for every audited command.

        Raises:
            ValueError: ``details`` is not JSON-serialisable.
        """
        return encode_audit_fields(_audit_fields(check, cmd, outcome, now_ms, ref, details))


def _audit_fields(check: Check, cmd: Command, outcome: AuditOutcome, now_ms: int, ref: str,
                  details: Optional[dict[str, Any]]) -> dict[str, Any]:
    who = check.principal
    why = {"reason" if check.code else "rule": check.reason}
    return {"id": ref, "time": now_ms, "principal": who.name if who else "",
            "tenant": who.tenant if who else check.resource.tenant, "action": check.action,
            "resource_type": check.resource.type, "resource_id": check.resource.id, "outcome": outcome,
            "details": {"command_type": cmd.type, "command_id": cmd.command_id, "instance_id": cmd.instance_id,
                        **({"code": check.code} if check.code else {}), **why, **(details or {})},
            "source": f"kafka:{ref}"}


class SeenTokens:
    """The token ids one partition accepted, in memory and as changelog records that outlive a restart.

    Each transaction that accepted tokens on the partition writes a record per
    :data:`SEEN_PER_RECORD` of them (key :data:`SEEN_KEY_PREFIX` + the batch's first offset + the
    record's number, value the JSON list of ``[jti, exp]``) and a tombstone for each earlier record
    whose tokens have all expired, so the compacted changelog holds only what can still be replayed. A new owner of the partition :meth:`load`-s the records
    its restored store holds. The ids a transaction added count only once it commits: an aborted
    batch is read again, and its tokens must pass again.
    """

    def __init__(self, capacity: int) -> None:
        self.cache = ReplayCache(capacity)
        self._records: list[tuple[float, bytes]] = []  # heap of (latest expiry, key) of the records written
        self._dropped: list[tuple[float, bytes]] = []  # tombstoned in the open transaction
        self._written: list[tuple[float, bytes]] = []  # written in the open transaction

    def load(self, records: Iterable[tuple[bytes, bytes]], now_s: float) -> None:
        """Remember the records of a restored store (key, value); expired ones are tombstoned next."""
        for key, value in records:
            try:
                entries = [(str(j), float(e)) for j, e in orjson.loads(value)]
            except (orjson.JSONDecodeError, TypeError, ValueError):
                log.error("skipping unreadable seen-tokens record %r", key)
                continue
            self.cache.load(entries, now_s)
            heapq.heappush(self._records, (max((e for _, e in entries), default=0.0), key))

    def changelog(self, first_offset: int, now_s: float) -> list[tuple[bytes, Optional[bytes]]]:
        """The records this transaction writes: the ids it accepted and tombstones of expired records."""
        out: list[tuple[bytes, Optional[bytes]]] = []
        while self._records and self._records[0][0] <= now_s:
            dropped = heapq.heappop(self._records)
            self._dropped.append(dropped)
            out.append((dropped[1], None))
        pending = self.cache.pending()
        for n, i in enumerate(range(0, len(pending), SEEN_PER_RECORD)):
            chunk = pending[i:i + SEEN_PER_RECORD]
            key = SEEN_KEY_PREFIX + first_offset.to_bytes(8, "big") + n.to_bytes(4, "big")
            self._written.append((max(e for _, e in chunk), key))
            out.append((key, orjson.dumps(chunk)))
        return out

    def committed(self) -> None:
        """The transaction committed: its ids count as seen for good."""
        for written in self._written:
            heapq.heappush(self._records, written)
        self.cache.commit()
        self._written, self._dropped = [], []

    def aborted(self) -> None:
        """The transaction aborted: its ids are forgotten and its tombstones were not written."""
        self.cache.rollback()
        for dropped in self._dropped:
            heapq.heappush(self._records, dropped)
        self._written, self._dropped = [], []
