"""Pure helpers for the definition graph: lay a spec's steps out for drawing, and work out which
steps of an instance are done, running, failed or still pending.

The layout is computed here (not in the browser) so the console stays a plain script: every
step is a box at ``(x, y)``; a ``parallel`` step's branches sit side by side below it, a
``foreach`` body is indented under it; edges are sequential flow, ``goto``/``choice`` routes and
``catch`` routes.

Step states come from the instance's history when it is at hand (:func:`history_steps`): the
history is replayed through the engine's own interpreter, which shows every step that ran —
also those that ran and finished inside one decision (a ``set``, a ``choice``, a catch handler,
the final ``succeed``), which no state record ever shows. Without a history, the state records
are tracked (:func:`track_steps`, :func:`resolve_steps`): a thread's current step is running; a
step that was running and no longer is, is done (or failed, when the instance ended FAILED,
CANCELLED or TERMINATED while on it); in a list without jumps the steps before a thread's
position are done even if no state record showed them running.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, Optional

from kflow.engine import INPUT_EVENTS, CompiledSpec, compile_spec, evolve
from kflow.engine.core import positions
from kflow.model.messages import Event

__all__ = ["MAX_REPLAY_EVENTS", "STEP_COLOURS", "STEP_STATES", "StepIndex", "history_steps", "layout", "render_dot",
           "render_mermaid", "render_svg", "resolve_steps", "step_index", "succeed_steps", "track_steps"]

#: The states a step can be shown in.
STEP_STATES = ("pending", "running", "done", "failed")

_KINDS = ("task", "choice", "parallel", "foreach", "wait", "sleep", "child", "set", "succeed", "fail")
_BOX_W, _BOX_H, _GAP_Y, _GAP_X, _INDENT = 170, 38, 26, 24, 26

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
    pending activity or child workflow (the public state record's ``position``)."""
    return set(positions(internal))


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


# --------------------------------------------------------------------------- steps from the history

#: Longest history replayed for a step view; beyond it callers fall back to state-record tracking.
MAX_REPLAY_EVENTS = 20_000
#: Statuses a decision can leave a RUNNING instance in when it ends (or starts to end) badly.
_BAD_ENDS = frozenset({"FAILED", "CANCELLED", "TERMINATED", "COMPENSATING", "CANCELLING"})
_STEP_NAMED = re.compile(r"step '([^']+)'")
_CHILD_PLACEHOLDER = object()


class _SeenSteps(list):  # type: ignore[type-arg]
    """A compiled step list that notes the id of every step the interpreter reads from it.

    The interpreter addresses steps only as ``lists[key][idx]``, and reads a step exactly when it
    runs it, resumes it with a result or an error, or looks up its retry and timeout policy.
    """

    def __init__(self, steps: list[Any], seen: list[str]) -> None:
        super().__init__(steps)
        self._seen = seen

    def __getitem__(self, i: Any) -> Any:
        item = super().__getitem__(i)
        if isinstance(i, int):
            self._seen.append(item.id)
        return item


class _ReplayDefinitions:
    """The definitions view of a replay: the instance's own (watched) definition, and for the
    workflows it starts as children the version its history recorded — the interpreter only
    checks that a child's definition exists."""

    def __init__(self, compiled: CompiledSpec, child_versions: dict[str, int]) -> None:
        self._compiled = compiled
        self._child_versions = child_versions

    def get(self, name: str, version: int) -> Optional[Any]:
        if (name, version) == (self._compiled.name, self._compiled.version):
            return self._compiled
        return _CHILD_PLACEHOLDER if self._child_versions.get(name) == version else None

    def latest(self, name: str) -> Optional[int]:
        return self._child_versions.get(name, self._compiled.version if name == self._compiled.name else None)


def history_steps(body: dict[str, Any], events: Sequence[Event]) -> Optional[dict[str, str]]:
    """Step id -> ``running``, ``done`` or ``failed`` for one instance of the spec ``body``.

    ``events`` is the instance's history, oldest first (its last run is used when the id was
    reused). Steps never reached are absent (pending). A step whose error a ``catch`` route
    handled is ``failed`` and the handler's steps are ``done``; a step still waiting when the
    instance failed, was cancelled or terminated is ``failed``; a ``fail`` step that ran is
    ``failed``. Returns None when the history is longer than :data:`MAX_REPLAY_EVENTS` or does
    not replay against ``body`` (another definition produced it).
    """
    starts = [i for i, ev in enumerate(events) if ev.type == "WorkflowStarted"]
    if not starts or len(events) > MAX_REPLAY_EVENTS:
        return None
    run = list(events[starts[-1]:])
    seen: list[str] = []
    try:
        base = compile_spec(body)
        watched = dataclasses.replace(base, lists={k: _SeenSteps(v, seen) for k, v in base.lists.items()})
        defs = _ReplayDefinitions(watched, {ev.data["workflow"]: ev.data["version"]
                                            for ev in run if ev.type == "ChildStarted"})
        ids = {key: [s.id for s in steps] for key, steps in base.lists.items()}
        kinds = {s.id: s for steps in base.lists.values() for s in steps}
        out: dict[str, str] = {}
        state: Optional[dict[str, Any]] = None
        for ev in run:
            if ev.type == "CommandRejected" and state is not None:
                state = {**state, "seq": ev.seq}  # as in the engine's fold: a rejection only takes a seq
            if ev.type not in INPUT_EVENTS:
                continue
            seen.clear()
            before = state
            state, _ = evolve(state, ev, defs)
            _account(out, before, state, ev, list(seen), ids, kinds)
        return out
    except Exception:  # noqa: BLE001 - a history this definition cannot replay gets the state-record view
        return None


def _account(out: dict[str, str], before: Optional[dict[str, Any]], after: dict[str, Any], ev: Event,
             seen: list[str], ids: dict[str, list[str]], steps: dict[str, Any]) -> None:
    """Fold one decision (``before`` -> ``after`` on ``ev``, reading the steps ``seen``) into ``out``."""
    if before is not None and before["status"] not in ("RUNNING", "INCIDENT"):
        return  # compensating or closing: no step of the definition runs (``seen`` are policy look-ups)
    blocked_before = _blocked(before, ids)
    blocked_after = _blocked(after, ids)
    for step in seen:
        out[step] = "done"
    failed = _error_path(before, after, ev, ids, steps)
    # a step that was waiting, was not resumed and waits no more was cut off by an error or the end
    failed |= blocked_before - blocked_after - set(seen)
    if after["status"] in _BAD_ENDS:
        failed |= {s for s in seen if steps[s].kind == "fail"}
        closing = after.get("error") or (after.get("closing") or {}).get("data") or {}
        named = _STEP_NAMED.search(str(closing.get("message") or ""))
        if not failed and named and named.group(1) in seen:
            failed.add(named.group(1))  # an expression or a limit failed the workflow in that step
    for step in failed:
        out[step] = "failed"
    for step in blocked_after:
        out[step] = "running"


def _blocked(state: Optional[dict[str, Any]], ids: dict[str, list[str]]) -> set[str]:
    """Steps some thread of ``state`` is blocked on (an activity, timer, signal, child or join)."""
    found: set[str] = set()
    for th in ((state or {}).get("threads") or {}).values():
        step = _step_at(th, ids)
        if th.get("wait") is not None and step is not None:
            found.add(step)
    return found


def _step_at(th: dict[str, Any], ids: dict[str, list[str]]) -> Optional[str]:
    steps = ids.get(th.get("list", ""), [])
    idx = th.get("idx")
    return steps[idx] if isinstance(idx, int) and 0 <= idx < len(steps) else None


def _error_path(before: Optional[dict[str, Any]], after: dict[str, Any], ev: Event, ids: dict[str, list[str]],
                steps: dict[str, Any]) -> set[str]:
    """The step an error hit in this decision, and the enclosing steps it propagated to until a
    matching ``catch`` took it (or the top level, where it failed the workflow)."""
    if before is None:
        return set()
    site = _error_site(before, after, ev)
    if site is None:
        return set()
    tid, error_type = site
    path: set[str] = set()
    while tid is not None and tid in before["threads"]:
        th = before["threads"][tid]
        step = _step_at(th, ids)
        if step is None:
            break
        path.add(step)
        if any(rule.matches(error_type) for rule in steps[step].catch or []):
            break
        tid = th.get("parent")
    return path


def _error_site(before: dict[str, Any], after: dict[str, Any], ev: Event) -> Optional[tuple[Optional[str], str]]:
    """``(thread, error type)`` when ``ev`` ended a step with an error: an activity that failed or
    timed out for good, a child that failed, a signal wait that timed out."""
    d = ev.data
    if ev.type == "ChildFailed":
        child = before["children"].get(d["child_id"]) or {}
        return child.get("thread"), d["error_type"]
    if ev.type == "ActivityFailed":
        return _activity_gave_up(before, after, d["activity_id"], d["error_type"])
    if ev.type == "TimerFired":
        timer = before["timers"].get(d["timer_id"]) or {}
        if timer.get("purpose") == "activity_timeout":
            return _activity_gave_up(before, after, timer.get("activity", ""), "ActivityTimeout")
        if timer.get("purpose") == "wait_timeout":
            return timer.get("thread"), "Timeout"
    return None


def _activity_gave_up(before: dict[str, Any], after: dict[str, Any], aid: str,
                      error_type: str) -> Optional[tuple[Optional[str], str]]:
    act = before["activities"].get(aid)
    if act is None or act.get("thread") is None or aid in after["activities"]:
        return None  # a compensation, or an attempt the retry policy tries again
    return act["thread"], error_type


# --------------------------------------------------------------------------- exported drawings

#: Step state -> (fill, stroke) in the exported drawings; ``incident``: a step waiting for an operator.
STEP_COLOURS = {"pending": ("#f5f5f5", "#9e9e9e"), "running": ("#bbdefb", "#1e88e5"), "done": ("#c8e6c9", "#43a047"),
                "failed": ("#ffcdd2", "#e53935"), "incident": ("#ffe0b2", "#fb8c00")}
#: Edge kinds drawn dashed: jumps rather than the sequential flow.
_JUMPS = frozenset({"goto", "choice", "catch"})


def _state_of(steps: Optional[dict[str, str]], step_id: str) -> Optional[str]:
    if steps is None:
        return None
    state = steps.get(step_id, "pending")
    return state if state in STEP_COLOURS else "pending"


def render_dot(body: dict[str, Any], steps: Optional[dict[str, str]] = None, title: str = "") -> str:
    """Graphviz DOT text of a spec document; with ``steps`` (step id -> state) each step is coloured."""
    def esc(text: str) -> str:
        return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")

    def q(text: str) -> str:
        return f'"{esc(text)}"'

    g = layout(body)
    lines = [f"digraph {q(title or str(body.get('name', 'workflow')))} {{", "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fillcolor="#ffffff"];',
             '  edge [fontname="Helvetica", fontsize=10];']
    for n in g["nodes"]:
        attrs = [f'label="{esc(n["id"])}\\n{esc(n["label"])}"']
        state = _state_of(steps, n["id"])
        if state is not None:
            fill, stroke = STEP_COLOURS[state]
            attrs += [f'fillcolor="{fill}"', f'color="{stroke}"', f"tooltip={q(state)}"]
        lines.append(f"  {q(n['id'])} [{', '.join(attrs)}];")
    for e in g["edges"]:
        attrs = [f"label={q(e['kind'])}", "style=dashed"] if e["kind"] in _JUMPS else []
        lines.append(f"  {q(e['source'])} -> {q(str(e['target']))}" + (f" [{', '.join(attrs)}]" if attrs else "") + ";")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_mermaid(body: dict[str, Any], steps: Optional[dict[str, str]] = None) -> str:
    """Mermaid flowchart text of a spec document; with ``steps`` each step gets its state's class."""
    g = layout(body)
    ids = {n["id"]: f"n{i}" for i, n in enumerate(g["nodes"])}

    def label(text: str) -> str:
        return text.replace('"', "#quot;")

    lines = ["flowchart TD"]
    for n in g["nodes"]:
        lines.append(f'  {ids[n["id"]]}["{label(n["id"])}<br/>{label(n["label"])}"]')
    for e in g["edges"]:
        src, dst = ids[e["source"]], ids.get(str(e["target"]))
        if dst is None:
            continue
        lines.append(f"  {src} -. {e['kind']} .-> {dst}" if e["kind"] in _JUMPS else f"  {src} --> {dst}")
    if steps is not None:
        used: dict[str, list[str]] = {}
        for n in g["nodes"]:
            used.setdefault(_state_of(steps, n["id"]) or "pending", []).append(ids[n["id"]])
        for state, members in used.items():
            fill, stroke = STEP_COLOURS[state]
            lines.append(f"  classDef {state} fill:{fill},stroke:{stroke};")
            lines.append(f"  class {','.join(members)} {state};")
    return "\n".join(lines) + "\n"


def render_svg(body: dict[str, Any], steps: Optional[dict[str, str]] = None, title: str = "") -> str:
    """A standalone SVG drawing of :func:`layout`'s boxes and edges, coloured like :func:`render_dot`."""
    from xml.sax.saxutils import escape

    g = layout(body)
    at = {n["id"]: n for n in g["nodes"]}
    top = 30 if title else 0
    width, height = g["width"] + 80, g["height"] + top + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" font-size="12">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#616161"/></marker></defs>']
    if title:
        out.append(f'<text x="10" y="20" font-size="14" font-weight="bold">{escape(title)}</text>')
    for e in g["edges"]:
        a, b = at.get(e["source"]), at.get(str(e["target"]))
        if a is None or b is None:
            continue
        if e["kind"] in _JUMPS:  # around the right-hand side, so jumps do not cross the boxes
            x1, y1 = a["x"] + a["w"], a["y"] + a["h"] // 2 + top
            x2, y2 = b["x"] + b["w"], b["y"] + b["h"] // 2 + top
            bend = max(x1, x2) + 40
            out.append(f'<path d="M {x1} {y1} C {bend} {y1}, {bend} {y2}, {x2} {y2}" fill="none" stroke="#616161" '
                       f'stroke-dasharray="4 3" marker-end="url(#arrow)"><title>{escape(e["kind"])}</title></path>')
        else:
            x1, y1 = a["x"] + a["w"] // 2, a["y"] + a["h"] + top
            x2, y2 = b["x"] + b["w"] // 2, b["y"] + top
            out.append(f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="#616161" marker-end="url(#arrow)"/>')
    for n in g["nodes"]:
        state = _state_of(steps, n["id"])
        fill, stroke = STEP_COLOURS[state] if state is not None else ("#ffffff", "#616161")
        x, y = n["x"], n["y"] + top
        out.append(f'<g class="step {state or ""}"><title>{escape(n["id"])}{": " + state if state else ""}</title>'
                   f'<rect x="{x}" y="{y}" width="{n["w"]}" height="{n["h"]}" rx="6" fill="{fill}" stroke="{stroke}"/>'
                   f'<text x="{x + 8}" y="{y + 15}" font-weight="bold">{escape(n["id"])}</text>'
                   f'<text x="{x + 8}" y="{y + 30}" fill="#424242">{escape(n["label"])}</text></g>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
