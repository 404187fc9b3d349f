"""The run context: one in-progress decision over one instance's state.

A :class:`Run` holds the (copied) state being evolved, the clock reading, the events emitted so
far (each stamped with the next per-instance sequence number) and the outputs that are not events
(tasks, commands for other instances, journal entries of code workflows). Interpreters only ever
change state through a Run, so a decision is a pure function of (state, input event, definitions,
journal).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional, cast

from kflow.engine.journal import EmptyJournal, Journal, JournalOp
from kflow.model.commands import AnyCommand, CancelWorkflow, CompleteChild, FailChild, to_data
from kflow.model.events import AnyEvent, UpdateCompleted
from kflow.model.events import to_data as event_data
from kflow.model.messages import Command, Event, JSONDict, Status, Task
from kflow.model.state import InstanceKind, InstanceState

#: State key of the instance's priority level (1-5): set at start from the command, else from the
#: definition's default; absent is ``normal``. Tasks and child starts inherit it unless overridden.
PRIORITY = "priority"

#: State key of a spec instance's open incidents: incident id -> the step's thread, step, activity
#: (name, queue, input, priority), error, role, instructions, timer and when it was raised. Absent
#: when none is open. While one is, the status is INCIDENT and ``error`` describes the newest.
INCIDENTS = "incidents"

#: State key of the instance's recent updates: update id -> ``{"name", "answer"}``, oldest first.
#: ``answer`` is None while the update's handler runs, then ``{"result": ...}`` or ``{"error":
#: {"type", "message"}}``; a repeated update id is answered from here without running it again.
UPDATES = "updates"
#: State key of a migration waiting for a safe point: the ``MigrateWorkflow`` data it was deferred
#: with (``MigrationDeferred``). Absent when none waits; closing or cancelling the instance drops it.
PENDING_MIGRATION = "pending_migration"

#: Called by both interpreters, only while the state has a :data:`PENDING_MIGRATION`, after an input
#: event's effect on the state and before the workflow runs on: :mod:`kflow.engine.migration`
#: registers the check that applies the migration there when the instance reached a safe point.
#: For a code workflow it returns the machine of the target code the instance continues on, else None.
AT_SAFE_POINT: list[Callable[[Run], Any]] = []

#: Most answered updates an instance keeps (running ones are always kept); each keeps its answer,
#: so this bounds what updates add to the state.
UPDATE_WINDOW = 64


class Recorder:
    """The events and commands one decision over one state produces, numbered from that state.

    Each event gets the state's next sequence number and stamps the state with it; each command gets
    a deterministic command id (the state's id, its sequence number, the command's index). Shared by
    :class:`Run` (an instance) and the deciders of the engine's other objects (limit counters,
    schedules).
    """

    __slots__ = ("state", "now", "events", "commands")

    def __init__(self, state: JSONDict, now: int) -> None:
        self.state = state
        self.now = now
        self.events: list[Event] = []
        self.commands: list[Command] = []

    def emit(self, type_: str, data: JSONDict) -> Event:
        """Record an event with the next sequence number and stamp the state with it."""
        st = self.state
        st["seq"] += 1
        st["updated_ms"] = self.now
        ev = Event(type=type_, instance_id=st["id"], seq=st["seq"], ts=self.now, data=data)
        self.events.append(ev)
        return ev

    def record(self, model: AnyEvent) -> Event:
        """Record the event ``model`` (:mod:`kflow.model.events`), as :meth:`emit`."""
        return self.emit(model.TYPE, event_data(model))

    def command(self, type_: str, instance_id: str, data: JSONDict) -> None:
        """Queue a command for another (or this) instance, with a deterministic command id."""
        cid = f"{self.state['id']}#{self.state['seq']}:{len(self.commands)}"
        self.commands.append(Command(type=type_, instance_id=instance_id, data=data, command_id=cid, ts=self.now))

    def send(self, model: AnyCommand, instance_id: str) -> None:
        """Queue the command ``model`` (:mod:`kflow.model.commands`) for ``instance_id``, as :meth:`command`."""
        self.command(model.TYPE, instance_id, to_data(model))


class Run(Recorder):
    """Mutable scratch space for one ``evolve`` call; never outlives it."""

    __slots__ = ("tasks", "defs", "runnable", "compiled", "journal", "journal_ops", "replies")

    def __init__(self, state: JSONDict, now: int, defs: Any, compiled: Any = None,
                 journal: Optional[Journal] = None) -> None:
        super().__init__(state, now)
        self.defs = defs
        self.compiled = compiled
        self.tasks: list[Task] = []
        self.runnable: list[str] = []
        #: where a code workflow's history is read on a rebuild (this decision's ops not included)
        self.journal: Journal = journal if journal is not None else EmptyJournal()
        #: what this decision did to the journal, in order
        self.journal_ops: list[JournalOp] = []
        #: answers to updates, (update id, answer): sent by the live processor, never by a replay
        self.replies: list[tuple[str, JSONDict]] = []

    @property
    def instance_id(self) -> str:
        iid: str = self.state["id"]
        return iid

    def next_seq(self) -> int:
        seq: int = self.state["seq"]
        return seq + 1

    @property
    def closed(self) -> bool:
        return self.state["status"] in Status.TERMINAL

    # -- closing the instance ------------------------------------------------------------
    def close(self, status: str, event_type: str, data: JSONDict) -> None:
        """End the instance: emit the terminal event, clear pending work, notify parent and children."""
        st = self.state
        self.emit(event_type, data)
        if status != Status.COMPLETED:
            self.note_stop()
        st["status"] = status
        st["closed_ms"] = self.now
        st.pop("closing", None)  # a saga's pending terminal event, superseded by this one
        if st.pop(INCIDENTS, None) is not None:
            st["error"] = None  # the open incidents' error; a failure sets its own below
        if status == Status.COMPLETED:
            st["result"] = data.get("result")
        else:
            st["error"] = {"type": data.get("error_type", "Cancelled"), "message": data.get("message", data.get("reason", ""))}
        for child_id in sorted(st["children"]):
            self.send(CancelWorkflow(reason=f"parent {st['id']} closed ({status.lower()})"), child_id)
        st["children"] = {}
        self.cancel_activities()
        st["timers"] = {}
        st["threads"] = {}
        st["signals"] = {}
        self.runnable.clear()
        self.abandon_updates(f"'{st['id']}' closed ({status}) before the update's handler finished")
        parent = st.get("parent_id")
        if parent:
            ref = st.get("parent_ref") or st["id"]
            if status == Status.COMPLETED:
                self.send(CompleteChild(child_id=ref, result=data.get("result")), parent)
            else:
                err = st["error"]
                self.send(FailChild(child_id=ref, error_type=err["type"], message=err["message"]), parent)

    # -- updates -------------------------------------------------------------------------
    def answer_update(self, update_id: str, answer: JSONDict) -> None:
        """An accepted update's handler finished: ``UpdateCompleted``, its answer kept and sent.

        ``answer`` is ``{"result": value}`` or ``{"error": {"type", "message"}}``. An update that
        is no longer running (the instance closed or continued meanwhile) is not answered twice.
        """
        entry = self.state.get(UPDATES, {}).get(update_id)
        if entry is None or entry["answer"] is not None:
            return
        err = answer.get("error")
        self.record(UpdateCompleted(update_id=update_id, result=answer.get("result"),
                                    error_type=err["type"] if err else None, message=err["message"] if err else None))
        entry["answer"] = answer
        self.replies.append((update_id, answer))
        trim_updates(self.state)

    def abandon_updates(self, why: str) -> None:
        """Answer every update still running with a ``WorkflowClosed`` error (the instance is ending).

        Only the answers are sent; no event is written (the closing event says what happened).
        """
        for update_id, entry in self.state.get(UPDATES, {}).items():
            if entry["answer"] is None:
                answer: JSONDict = {"error": {"type": "WorkflowClosed", "message": why}}
                entry["answer"] = answer
                self.replies.append((update_id, answer))
        trim_updates(self.state)

    def note_stop(self) -> None:
        """Remember the top-level step a spec instance stands at as it closes (``stopped_at``).

        That is where a retry re-opens it by default: the failing step, or the ``parallel`` or
        ``foreach`` step enclosing it. Kept as the step's index in the top-level list, not read
        from the definition here: closing reads no step. Call before the threads are cleared.
        """
        st = self.state
        root = next((t for t in st["threads"].values() if t["parent"] is None), None)
        if st["kind"] == "spec" and root is not None:
            st["stopped_at"] = root["idx"]

    def complete(self, result: Any) -> None:
        self.close(Status.COMPLETED, "WorkflowCompleted", {"result": result})

    def fail(self, error_type: str, message: str) -> None:
        self.close(Status.FAILED, "WorkflowFailed", {"error_type": error_type, "message": message})

    def cancel_task(self, activity_id: str, act: JSONDict) -> None:
        """Tell the workers of ``act``'s queue that its current attempt is no longer wanted.

        Attempts waiting out a retry backoff have nothing running and get no message; neither do
        local activities, which never outlive the transaction that runs them.
        """
        if act.get("phase") == "backoff" or act.get("local"):
            return
        self.tasks.append(Task(instance_id=self.state["id"], activity_id=activity_id, attempt=act["attempt"],
                               name=act["name"], queue=act["queue"], input=None, workflow=self.state["workflow"],
                               scheduled_ms=self.now, kind="cancel", priority=self.priority(act.get(PRIORITY))))

    def cancel_activities(self) -> None:
        """Forget every pending activity, sending a cancel task for each running attempt."""
        acts = self.state["activities"]
        for aid in sorted(acts):
            self.cancel_task(aid, acts[aid])
        self.state["activities"] = {}

    def task(self, activity_id: str, name: str, queue: str, input_: Any, attempt: int, workflow: str,
             report_start: bool = False, *, local: bool = False, start_to_close_ms: Optional[int] = None,
             priority: Optional[int] = None) -> None:
        self.tasks.append(Task(instance_id=self.state["id"], activity_id=activity_id, attempt=attempt, name=name,
                               queue=queue, input=input_, workflow=workflow, scheduled_ms=self.now,
                               report_start=report_start, local=local, start_to_close_ms=start_to_close_ms,
                               priority=self.priority(priority)))

    def priority(self, own: Optional[int] = None) -> Optional[int]:
        """The level work of this instance is dispatched at: its own override, else the instance's.

        None is ``normal``: the instance was started without a level and inherited none.
        """
        return own if own is not None else self.state.get(PRIORITY)


def new_state(instance_id: str, workflow: str, version: int, kind: str, input_: Any, now: int,
              parent_id: Optional[str], parent_ref: Optional[str], seq: int = 0) -> JSONDict:
    """A fresh instance state; ``seq`` carries over when an id is reused after close.

    It is an :class:`~kflow.model.state.InstanceState` (which declares every key the engine writes),
    handed out as the plain dict the engine changes in place; ``kind`` is ``spec`` or ``code``.
    """
    state: InstanceState = {
        "id": instance_id, "workflow": workflow, "version": version, "kind": cast(InstanceKind, kind),
        "status": Status.RUNNING, "seq": seq, "started_ms": now, "updated_ms": now, "closed_ms": None,
        "input": input_, "vars": {}, "result": None, "error": None,
        "parent_id": parent_id, "parent_ref": parent_ref,
        "threads": {}, "next_tid": 0, "activities": {}, "timers": {}, "children": {}, "signals": {},
    }
    return cast(JSONDict, state)


def trim_updates(state: JSONDict) -> None:
    """Keep at most :data:`UPDATE_WINDOW` answered updates, dropping the oldest answered first."""
    updates = state.get(UPDATES)
    if not updates:
        return
    answered = [k for k, v in updates.items() if v["answer"] is not None]
    for k in answered[:max(0, len(answered) - UPDATE_WINDOW)]:
        del updates[k]
