"""kflow's security foundation: signed tokens, policy evaluation and the audit record.

:mod:`kflow.security.tokens` proves who sent a command or a result; :mod:`kflow.security.policy`
decides what they may do; :mod:`kflow.security.audit` records both; :mod:`kflow.security.guard`
is how the engine applies the three to every command it reads. The processes (engine, API
server, clients) call these; nothing here touches Kafka.
"""

from __future__ import annotations

from kflow.security.audit import AuditRecord, decode_audit, encode_audit
from kflow.security.guard import Check, CommandGuard, SeenTokens
from kflow.security.policy import (
    ACTIONS,
    Grant,
    Permission,
    Policy,
    PolicyError,
    Resource,
    Verdict,
    evaluate,
    load_policy,
    parse_policy,
)
from kflow.security.principal import DEFAULT_TENANT, SYSTEM_ADMIN, AuthError, Principal
from kflow.security.tokens import (
    ATTEMPT_HEADER,
    COMMAND_HEADER,
    CommandSigner,
    KeyConfigError,
    Keys,
    ReplayCache,
    attempt_token,
    check_attempt_token,
    check_progress_token,
    command_digest,
    issue,
    progress_token,
    sign_command,
    verify_command,
    verify_token,
)

__all__ = [
    "ACTIONS",
    "ATTEMPT_HEADER",
    "COMMAND_HEADER",
    "DEFAULT_TENANT",
    "SYSTEM_ADMIN",
    "AuditRecord",
    "AuthError",
    "Check",
    "CommandGuard",
    "CommandSigner",
    "Grant",
    "KeyConfigError",
    "Keys",
    "Permission",
    "Policy",
    "PolicyError",
    "Principal",
    "ReplayCache",
    "Resource",
    "SeenTokens",
    "Verdict",
    "attempt_token",
    "check_attempt_token",
    "check_progress_token",
    "command_digest",
    "decode_audit",
    "encode_audit",
    "evaluate",
    "issue",
    "progress_token",
    "load_policy",
    "parse_policy",
    "sign_command",
    "verify_command",
    "verify_token",
]
