"""``kflow replay``: check recorded histories against the code workflows of a module, before deploying it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from kflow.model.errors import KflowError

__all__ = ["replay"]


def _histories(doc: Any) -> list[dict[str, Any]]:
    """A file holds one history (a list of events, or ``{"events": [...], "state": {...}}``) or a list of them."""
    if isinstance(doc, dict):
        return [doc]
    if isinstance(doc, list) and doc and isinstance(doc[0], list):
        return [{"events": h} for h in doc]
    if isinstance(doc, list) and doc and isinstance(doc[0], dict) and "events" in doc[0]:
        return doc
    return [{"events": doc}]


def replay(
    workflows: Annotated[str, typer.Option("--workflows", metavar="MODS",
                                           help="Comma-separated modules of code workflows (the new code).")],
    file: Annotated[Path, typer.Option("--file", "-f", metavar="FILE", exists=True, dir_okay=False,
                                       help="JSON history: a list of events, {events, state}, or a list of those.")],
    workflow: Annotated[Optional[str], typer.Option("--workflow", metavar="NAME[@VERSION]",
                                                    help="Replay with this workflow instead of the one the history started.")] = None,
) -> None:
    """Replay recorded histories against code workflows and fail on non-determinism.

    Each history is re-run with the code in --workflows; every command the code issues must equal
    the one recorded. Exit code 0 when all histories replay, 1 (with the first mismatch) otherwise.

    Example: kflow replay --workflows shop.workflows --file order-42.json
    """
    from kflow._workflow import code_definitions
    from kflow.engine.code_replayer import REGISTRY
    from kflow.testing import replay as replay_history

    code_definitions(workflows)
    histories = _histories(json.loads(file.read_text()))
    for i, h in enumerate(histories):
        events = h.get("events") or []
        started = next((e for e in events if e.get("type") == "WorkflowStarted"), None)
        name, _, version = (workflow or "").partition("@")
        if not name:
            if started is None:
                raise KflowError(f"history {i}: no WorkflowStarted event; pass --workflow NAME@VERSION")
            name, version = started["data"]["workflow"], str(started["data"]["version"])
        versions = [v for (n, v) in REGISTRY if n == name]
        v = int(version) if version else (max(versions) if versions else 0)
        definition = REGISTRY.get((name, v))
        if definition is None:
            raise KflowError(f"history {i}: code workflow '{name}@{v}' is not registered by {workflows}")
        replay_history(definition, events, state=h.get("state"))
        iid = events[0].get("instance_id", "?") if events else "?"
        typer.echo(f"ok {iid}: {len(events)} events replay on {name}@{v}")
