"""An in-memory engine harness with a manual clock: run workflows through the pure engine in tests.

``EngineHarness`` keeps instance states and histories in dicts, routes the commands a decision
emits (children, parent notifications) back through ``decide``, runs registered activity functions
for scheduled tasks, and fires due timers when the clock is advanced — time skipping without
sleeping. ``reprocess()`` folds every recorded history from scratch and must reproduce the live
states exactly. It is the same ``decide``/``evolve`` the Kafka processor runs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Optional

from kflow.engine import Decision, InMemoryDefinitions, compile_spec, decide, fold
from kflow.engine.code_cache import ReplayCache
from kflow.engine.registry import WorkflowRegistry
from kflow.model.messages import Command, Event, JSONDict, Task


class ManualClock:
    """A :class:`~kflow.clock.Clock` that only moves when told to (milliseconds)."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self.ms = start_ms

    def now_ms(self) -> int:
        return self.ms

    def advance(self, seconds: float) -> None:
        self.ms += int(seconds * 1000)


class EngineHarness:
    """Drive the pure engine in memory. Activities registered here run synchronously."""

    def __init__(self, clock: Optional[ManualClock] = None, *, registry: Optional[WorkflowRegistry] = None,
                 replay_cache: Optional[ReplayCache] = None) -> None:
        self.clock = clock or ManualClock()
        #: the definitions decided against; they carry ``registry`` (code workflows, migration
        #: transforms; the default one unless given) and ``replay_cache`` (a fresh one unless given)
        self.defs = InMemoryDefinitions(registry, replay_cache)
        self.states: dict[str, JSONDict] = {}
        self.history: dict[str, list[Event]] = {}
        self.activities: dict[str, Callable[[Any], Any]] = {}
        self.pending_tasks: deque[Task] = deque()
        #: Cancel messages the engine sent for attempts it no longer wants, in order.
        self.cancelled_tasks: list[Task] = []
        self.dlq: list[tuple[Command, str]] = []
        self.auto_run_tasks = True
        #: Answers the engine sent (to queries and updates), by query or update id.
        self.replies: dict[str, JSONDict] = {}
        self._cmds: deque[Command] = deque()

    @property
    def replay_cache(self) -> ReplayCache:
        """The live code-workflow machines of this harness; ``clear()`` it to replay as after a restart."""
        return self.defs.replay_cache

    # -- setup ------------------------------------------------------------------------------
    def deploy(self, doc: dict[str, Any]) -> None:
        self.defs.add(compile_spec(doc))

    def activity(self, name: str, fn: Callable[[Any], Any]) -> None:
        self.activities[name] = fn

    # -- driving ----------------------------------------------------------------------------
    def send(self, type_: str, instance_id: str, **data: Any) -> None:
        """Submit a command and process everything it causes until the system is quiet."""
        self._cmds.append(Command(type=type_, instance_id=instance_id, data=data))
        self.drain()

    def start(self, workflow: str, instance_id: str, input: Any = None, version: Optional[int] = None) -> None:
        self.send("StartWorkflow", instance_id, workflow=workflow, version=version, input=input)

    def signal(self, instance_id: str, name: str, data: Any = None, command_id: str = "") -> None:
        self._cmds.append(Command("SignalWorkflow", instance_id, {"name": name, "data": data}, command_id))
        self.drain()

    def update(self, instance_id: str, name: str, data: Any = None, update_id: str = "") -> Optional[JSONDict]:
        """Send update ``name`` and process what it causes; return its answer, or None if there is none yet.

        The answer is ``{"result": ...}``, or ``{"error": {"type", "message"}}`` (with ``"rejected":
        True`` when the update was refused before it was accepted). An async handler waiting on an
        activity or a timer answers later: read ``replies[update_id]`` once they have run.
        """
        uid = update_id or f"{instance_id}:update-{len(self.replies)}-{len(self.history.get(instance_id, ()))}"
        self.replies.pop(uid, None)
        self._cmds.append(Command("UpdateWorkflow", instance_id, {"update_id": uid, "name": name, "data": data}, uid))
        self.drain()
        return self.replies.get(uid)

    def advance(self, seconds: float) -> None:
        """Move the clock and fire every timer that became due, in due order."""
        self.clock.advance(seconds)
        while True:
            due = sorted((t["due"], iid, tid) for iid, st in self.states.items()
                         for tid, t in st.get("timers", {}).items() if t["due"] <= self.clock.ms)
            if not due:
                return
            _, iid, tid = due[0]
            self.send("FireTimer", iid, timer_id=tid)

    def drain(self) -> None:
        while self._cmds or (self.auto_run_tasks and self.pending_tasks):
            while self._cmds:
                self._process(self._cmds.popleft())
            if self.auto_run_tasks and self.pending_tasks:
                self.run_task(self.pending_tasks.popleft())

    def run_task(self, task: Task) -> None:
        fn = self.activities.get(task.name)
        base = {"activity_id": task.activity_id, "attempt": task.attempt}
        if fn is None:
            self._cmds.append(Command("FailActivity", task.instance_id, {**base, "error_type": "UnknownActivity",
                                                                       "message": task.name, "retryable": False}))
        else:
            try:
                self._cmds.append(Command("CompleteActivity", task.instance_id, {**base, "result": fn(task.input)}))
            except Exception as e:  # an activity's failure is data for the workflow
                self._cmds.append(Command("FailActivity", task.instance_id, {**base, "error_type": type(e).__name__,
                                                                           "message": str(e), "retryable": True}))

    def _process(self, cmd: Command) -> Decision:
        d = decide(self.states.get(cmd.instance_id), cmd, self.clock.ms, self.defs)
        if d.dlq_reason:
            self.dlq.append((cmd, d.dlq_reason))
            return d
        self.replies.update(d.replies)
        if d.state is not None and d.events:
            self.states[cmd.instance_id] = d.state
            self.history.setdefault(cmd.instance_id, []).extend(d.events)
        for t in d.tasks:
            (self.cancelled_tasks if t.kind == "cancel" else self.pending_tasks).append(t)
        self._cmds.extend(d.commands)
        return d

    # -- checks ----------------------------------------------------------------------------
    def status(self, instance_id: str) -> str:
        return self.states[instance_id]["status"]

    def result(self, instance_id: str) -> Any:
        return self.states[instance_id]["result"]

    def events(self, instance_id: str) -> list[str]:
        return [e.type for e in self.history.get(instance_id, [])]

    def reprocess(self) -> dict[str, JSONDict]:
        """Fold every history from scratch; equals ``self.states`` when the engine is deterministic."""
        return {iid: fold(evs, self.defs) for iid, evs in self.history.items()}  # type: ignore[misc]
