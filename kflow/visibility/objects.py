"""The API's views of what is not a plain instance list: open incidents, limit counters and queues.

Pure functions over what the visibility store holds: the state documents of instances in status
INCIDENT (their ``incidents`` map) and of the limit counters (kind ``limit``, keys
``limit:<name>[:<key>]``, the shape :mod:`kflow.engine.limits` decides). Nothing here reads Kafka.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

from kflow.engine.limits import PREFIX as LIMIT_PREFIX
from kflow.engine.limits import START_REF, limit_view
from kflow.model.messages import PRIORITIES

__all__ = ["LEVELS", "incident_rows", "limit_key_part", "limit_rows", "queued_by_level"]

#: Priority level number -> name, most urgent first.
LEVELS: dict[int, str] = {n: name for name, n in sorted(PRIORITIES.items(), key=lambda kv: kv[1])}


def incident_rows(states: Iterable[dict[str, Any]], role: Optional[str] = None) -> list[dict[str, Any]]:
    """One row per open incident of the instance rows ``states`` (``internal`` = the engine's state),
    oldest first; ``role`` keeps those whose step names that role."""
    rows = []
    for st in states:
        for incident_id, inc in sorted(((st.get("internal") or {}).get("incidents") or {}).items()):
            if not isinstance(inc, dict) or (role and inc.get("role") != role):
                continue
            err = inc.get("error") or {}
            rows.append({"instance_id": st["instance_id"], "workflow": st["workflow"], "version": st["version"],
                         "tenant": st.get("tenant"), "incident_id": incident_id, "step": inc.get("step"),
                         "activity": inc.get("name"), "role": inc.get("role") or None,
                         "error_type": err.get("type"), "message": err.get("message"),
                         "instructions": inc.get("instructions") or "", "attempts": inc.get("attempts"),
                         "raised_ms": inc.get("raised_ms"), "timeout": inc.get("timeout")})
    rows.sort(key=lambda r: (r["raised_ms"] or 0, r["instance_id"], r["incident_id"]))
    return rows


def limit_key_part(state: dict[str, Any]) -> Optional[str]:
    """The per-key (or per-tenant) part of a counter's key, None for a limit counted as one."""
    rest = str(state["id"])[len(LIMIT_PREFIX) + len(str(state["limit"])):]
    return rest[1:] if rest.startswith(":") else None


def limit_rows(states: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per limit counter: in use, allowed (the declared maximum the counter last applied),
    queued (starts and activity attempts, and by level), granted and refused so far."""
    rows = []
    for st in states:
        view = limit_view(st)
        starts = sum(1 for q in st.get("queue") or () if q.get("ref") == START_REF)
        rows.append({**view, "key_part": limit_key_part(st), "allowed": st.get("max"), "queued_starts": starts,
                     "queued_activities": view["queued"] - starts, "updated_ms": st.get("updated_ms")})
    return rows


def queued_by_level(states: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Queued requests of every counter summed per priority level: starts and activity attempts.

    A queued start waits on one counter at a time (it asks its limits in turn), so it is counted once.
    """
    starts = dict.fromkeys(LEVELS, 0)
    activities = dict.fromkeys(LEVELS, 0)
    for st in states:
        for q in st.get("queue") or ():
            level = q.get("priority")
            if level not in LEVELS:
                continue
            if q.get("ref") == START_REF:
                starts[level] += 1
            else:
                activities[level] += 1
    return [{"level": n, "name": LEVELS[n], "starts": starts[n], "activities": activities[n]} for n in LEVELS]
