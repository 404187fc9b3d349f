"""Pure helpers for the definition graph: lay a spec's steps out for drawing, and track which
steps of an instance are done, running or failed as its state records go by.

The layout is computed here (not in the browser) so the console stays a plain script: every
step is a box at ``(x, y)``; a ``parallel`` step's branches sit side by side below it, a
``foreach`` body is indented under it; edges are sequential flow, ``goto``/``choice`` routes and
``catch`` routes. Step tracking only reads the public state record: a thread's current step is
running; a step that was running and no longer is, is done (or failed, when the instance ended
FAILED, CANCELLED or TERMINATED while on it); in a list without jumps the steps before a
thread's position are done even if no state record showed them running.
"""

from __future__ import annotations

from typing import Any

__all__ = ["StepIndex", "layout", "resolve_steps", "step_index", "succeed_steps", "track_steps", "STEP_STATES"]

#: The states a step can be shown in.
STEP_STATES = ("pending", "running", "done", "failed")

_KINDS = ("task", "choice", "parallel", "foreach", "wait", "sleep", "child", "set", "succeed", "fail")
_BOX_W, _BOX_H, _GAP_Y, _GAP_X, _INDENT = 170, 38, 26, 24, 26
_COMPENSATE_PREFIX = "compensate:"

#: ``list key -> (step ids in order, linear?)``: the spec's step lists as the interpreter keys them.
StepIndex = dict[str, tuple[list[str], bool]]


def _kind(step: dict[str, Any]) -> str:
    return next((k for k in _KINDS if k in step), "")


def _label(step: dict[str, Any], kind: str) -> str:
    detail = {"task": step.get("task"), "wait": (step.get("wait") or {}).get("signal"), "sleep": step.get("sleep"),
              "child": (step.get("child") or {}).get("workflow")}.get(kind)
    return f"{kind} {detail}" if detail not in (None, "") else kind


def step_index(body: dict[str, Any]) -> StepIndex:
    """The step lists of a spec document, keyed like the interpreter keys them.

    ``""`` is the top level, ``"<step>.<i>"`` branch ``i`` of a parallel step, ``"<step>"`` a
    foreach body. A list is *linear* when none of its steps jumps (``goto``, ``choice``, ``catch``).
    """
    out: StepIndex = {}

    def walk(key: str, steps: list[dict[str, Any]]) -> None:
        linear = not any(s.get("goto") or s.get("choice") or s.get("catch") for s in steps)
        out[key] = ([str(s.get("id")) for s in steps], linear)
        for s in steps:
            for i, branch in enumerate(s.get("parallel") or []):
                walk(f"{s['id']}.{i}", branch.get("steps") or [])
            if "foreach" in s and s.get("steps"):
                walk(str(s["id"]), s["steps"])

    walk("", list(body.get("steps") or []))
    return out


def layout(body: dict[str, Any]) -> dict[str, Any]:
    """Boxes and edges to draw a spec document: ``{width, height, nodes, edges}``.

    Each node is ``{id, kind, label, x, y, w, h}``; each edge ``{source, target, kind}`` with kind
    ``next``, ``goto``, ``choice``, ``catch``, ``branch``, ``body`` or ``join`` (from the last step
    of a branch or foreach body to the step after the parallel/foreach step).
    """
    nodes: list[dict[str, Any]] = []
    edges: list[dict[str, Any]] = []

    def place(steps: list[dict[str, Any]], x: int, y: int) -> tuple[int, int]:
        """Lay out one list from (x, y); returns (width, bottom y)."""
        width = _BOX_W
        for i, s in enumerate(steps):
            kind = _kind(s)
            sid = str(s.get("id"))
            nodes.append({"id": sid, "kind": kind, "label": _label(s, kind), "x": x, "y": y, "w": _BOX_W, "h": _BOX_H})
            y += _BOX_H + _GAP_Y
            ends: list[str] = []  # last steps of branches/bodies: the flow joins from there
            if kind == "parallel":
                bx, bottom = x, y
                for branch in s.get("parallel") or []:
                    inner = branch.get("steps") or []
                    if inner:
                        edges.append({"source": sid, "target": str(inner[0].get("id")), "kind": "branch"})
                        ends.append(str(inner[-1].get("id")))
                    w, b = place(inner, bx, y)
                    bx += w + _GAP_X
                    bottom = max(bottom, b)
                width = max(width, bx - x - _GAP_X)
                y = bottom
            elif kind == "foreach" and s.get("steps"):
                inner = s["steps"]
                edges.append({"source": sid, "target": str(inner[0].get("id")), "kind": "body"})
                ends.append(str(inner[-1].get("id")))
                w, y = place(inner, x + _INDENT, y)
                width = max(width, w + _INDENT)
            for rule in s.get("choice") or []:
                edges.append({"source": sid, "target": rule.get("goto"), "kind": "choice"})
            if s.get("otherwise"):
                edges.append({"source": sid, "target": s["otherwise"], "kind": "choice"})
            for rule in s.get("catch") or []:
                edges.append({"source": sid, "target": rule.get("goto"), "kind": "catch"})
            if s.get("goto"):
                edges.append({"source": sid, "target": s["goto"], "kind": "goto"})
            elif i + 1 < len(steps) and kind not in ("succeed", "fail") and not s.get("otherwise"):
                target = str(steps[i + 1].get("id"))
                edges.extend({"source": end, "target": target, "kind": "join"} for end in ends)
                if not ends:
                    edges.append({"source": sid, "target": target, "kind": "next"})
        return width, y

    width, bottom = place(list(body.get("steps") or []), 10, 10)
    return {"width": width + 60, "height": bottom, "nodes": nodes, "edges": edges}


def _running(internal: dict[str, Any]) -> set[str]:
    """Position keys a state shows in progress: ``p:<list>:<idx>`` per thread, ``s:<step>`` per
    pending activity or child workflow."""
    running: set[str] = set()
    for th in (internal.get("threads") or {}).values():
        idx = th.get("idx", 0)
        if isinstance(idx, int):
            running.add(f"p:{th.get('list', '')}:{idx}")
    for act in (internal.get("activities") or {}).values():
        step = act.get("step")
        if isinstance(step, str):
            running.add("s:" + step.removeprefix(_COMPENSATE_PREFIX))
    for child in (internal.get("children") or {}).values():
        if isinstance(child, dict) and isinstance(child.get("step"), str):
            running.add("s:" + child["step"])
    return running


def track_steps(previous: dict[str, str], status: str, internal: dict[str, Any]) -> dict[str, str]:
    """The tracked positions after a new state record, given those after the record before.

    Positions are kept as keys that need no definition (``p:<list>:<idx>``, ``s:<step>``), so
    the result does not depend on whether the definition was folded before the state: folding
    the same records in the same order per instance always gives the same map.
    :func:`resolve_steps` turns it into step ids.
    """
    out = dict(previous)
    running = _running(internal)
    ended_badly = status in ("FAILED", "CANCELLED", "TERMINATED")
    for key, was in previous.items():
        if was == "running" and key not in running:
            out[key] = "failed" if ended_badly else "done"
    for key in running:
        out[key] = "running"
    return out


_RANK = {"pending": 0, "done": 1, "failed": 2, "running": 3}


def resolve_steps(tracked: dict[str, str], index: StepIndex, status: str = "",
                  succeeds: frozenset[str] = frozenset()) -> dict[str, str]:
    """Step id -> state from tracked positions.

    In a list without jumps, steps before a tracked position count as done even if no state
    record showed them running; when the instance COMPLETED, so do the steps after the last
    tracked position up to the end of the list or its first ``succeed`` step (ids in ``succeeds``).
    """
    out: dict[str, str] = {}
    furthest: dict[str, int] = {}

    def put(step: str, state: str) -> None:
        if _RANK[state] > _RANK.get(out.get(step, "pending"), 0):
            out[step] = state

    for key, state in tracked.items():
        if key.startswith("s:"):
            put(key[2:], state)
            continue
        _, _, rest = key.partition(":")
        list_key, _, idx_text = rest.rpartition(":")
        ids, linear = index.get(list_key, ([], False))
        idx = int(idx_text) if idx_text.isdigit() else -1
        if 0 <= idx < len(ids):
            put(ids[idx], state)
        if linear:
            furthest[list_key] = max(furthest.get(list_key, -1), idx)
            for before in ids[:max(idx, 0)]:
                put(before, "done")
    if status == "COMPLETED":
        for list_key, idx in furthest.items():
            for step in index[list_key][0][max(idx, 0):]:
                put(step, "done")
                if step in succeeds:
                    break
    return out


def succeed_steps(body: dict[str, Any]) -> frozenset[str]:
    """Ids of the ``succeed`` steps of a spec document (any depth)."""
    found: set[str] = set()

    def walk(steps: list[dict[str, Any]]) -> None:
        for s in steps:
            if "succeed" in s:
                found.add(str(s.get("id")))
            for branch in s.get("parallel") or []:
                walk(branch.get("steps") or [])
            walk(s.get("steps") or [])

    walk(list(body.get("steps") or []))
    return frozenset(found)
