"""The deterministic machine that steps a Python ``async def`` workflow by hand.

A code workflow's coroutine is never run by an asyncio loop: :class:`Machine` sends into it,
and every ``ctx`` operation either issues a *command* (schedule an activity, start a timer, start a
child, record a side-effect value or a patch marker) or waits on a future that an *input event*
resolves (:meth:`Machine.deliver`). Commands become the same consequence events and state entries
the spec interpreter writes (``ActivityScheduled`` + a task, ``TimerStarted`` + ``state["timers"]``,
``ChildStarted`` + ``StartWorkflow``), so the deciders in :mod:`kflow.engine.core` handle both
kinds alike. Replaying (``live`` False), each command is checked against the recorded one and a
difference raises :class:`ReplayMismatch` through the workflow code; live, commands are recorded.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Optional, Union

import orjson

from kflow.engine import activity as activities
from kflow.engine.activity import LimitExceeded, limits_of
from kflow.engine.code_context import ContinueAsNew, WorkflowContext, as_json
from kflow.engine.run import PRIORITY, Run
from kflow.model.commands import SetPriority, StartWorkflow
from kflow.model.errors import ActivityError, CancelledError, DeterminismError, WorkflowError
from kflow.model.events import ChildStarted
from kflow.model.messages import JSONDict, priority_level

__all__ = ["CodeDefinition", "Machine", "NondeterminismError", "ReplayMismatch", "describe", "outcome"]


class NondeterminismError(DeterminismError):
    """Workflow code issued a different command than its history recorded at ``event_index``."""

    def __init__(self, instance_id: str, event_index: int, expected: str, actual: str) -> None:
        self.event_index = event_index
        super().__init__(instance_id, None, expected, actual,
                         f"instance {instance_id}: non-deterministic workflow code at command #{event_index}: "
                         f"history has {expected}, but the code now issues {actual}")


@dataclass
class CodeDefinition:
    """A registered code workflow; lives in the definitions table next to compiled specs.

    ``sandbox`` is a factory of context managers entered around every step of workflow code, with a
    ``paused()`` method that lifts it (for side-effect functions); None runs code unguarded.
    """

    name: str
    version: int
    fn: Callable[[Any, Any], Coroutine[Any, Any, Any]]
    kind: str = "code"
    module: str = ""
    sandbox: Any = None
    retry: Optional[JSONDict] = None  # the default retry policy of its activities
    execution_timeout_ms: Optional[int] = None


# -- futures and tasks ---------------------------------------------------------------------------
class _Future:
    """A value a workflow task awaits; resolved only by the machine, in a deterministic order."""

    __slots__ = ("done", "value", "error", "callbacks")

    def __init__(self) -> None:
        self.done = False
        self.value: Any = None
        self.error: Optional[BaseException] = None
        self.callbacks: list[Callable[[], None]] = []

    def set_result(self, value: Any) -> None:
        self._finish(value, None)

    def set_error(self, error: BaseException) -> None:
        self._finish(None, error)

    def _finish(self, value: Any, error: Optional[BaseException]) -> None:
        if self.done:
            return
        self.done, self.value, self.error = True, value, error
        callbacks, self.callbacks = self.callbacks, []
        for cb in callbacks:
            cb()

    def on_done(self, cb: Callable[[], None]) -> None:
        if self.done:
            cb()
        else:
            self.callbacks.append(cb)

    def __await__(self) -> Generator[Any, None, Any]:
        while not self.done:
            yield self
        if self.error is not None:
            raise self.error
        return self.value


class _Task:
    __slots__ = ("coro", "future")

    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        self.coro = coro
        self.future = _Future()


class ReplayMismatch(BaseException):
    """Raised through workflow code (a BaseException, so ``except Exception`` cannot swallow it)."""

    def __init__(self, index: int, expected: str, actual: str) -> None:
        self.index, self.expected, self.actual = index, expected, actual
        super().__init__(f"#{index}: expected {expected}, actual {actual}")


def describe(entry: Optional[list[Any]]) -> str:
    if entry is None:
        return "no further command"
    kind, name = entry[0], entry[1]
    return {"activity": f"activity '{name}'", "timer": f"timer ({name})", "child": f"child workflow '{name}'",
            "side_effect": "side effect", "patch": f"patch marker '{name}'"}.get(kind, f"{kind} '{name}'")


def outcome(machine: Machine) -> str:
    assert machine.root is not None
    err = machine.root.future.error
    return "workflow completion" if err is None else f"workflow failure ({type(err).__name__}: {err})"


def error_answer(e: BaseException) -> JSONDict:
    return {"error": {"type": getattr(e, "type", None) or type(e).__name__,
                      "message": str(getattr(e, "message", None) or e)}}


def result_answer(value: Any, name: str) -> JSONDict:
    try:
        return {"result": orjson.loads(orjson.dumps(value))}
    except TypeError as e:
        return {"error": {"type": "InvalidResult", "message": f"the result of update '{name}' is not JSON: {e}"}}


# -- the machine ---------------------------------------------------------------------------------
class Machine:
    """One live workflow coroutine plus the futures it waits on."""

    def __init__(self, definition: CodeDefinition, instance_id: str, recorded: list[list[Any]]) -> None:
        self.definition = definition
        self.instance_id = instance_id
        self.ctx = WorkflowContext(self)
        #: replaying: the run's recorded commands, checked in order; live: where issued ones are appended
        self.recorded = recorded
        self.cursor = 0
        self.live = False
        self.run: Optional[Run] = None
        self.now = 0
        self.seed = ""
        self.draws = 0
        self.ready: deque[_Task] = deque()
        self.root: Optional[_Task] = None
        self.ops: dict[str, tuple[str, _Future]] = {}
        self.signal_waiters: dict[str, list[tuple[_Future, Optional[str]]]] = {}
        self.signal_buffer: dict[str, list[Any]] = {}
        self.patches: dict[str, bool] = {}
        self.queries: dict[str, Callable[..., Any]] = {}
        self.signal_handlers: dict[str, Callable[[Any], Any]] = {}
        self.update_handlers: dict[str, tuple[Callable[[Any], Any], Optional[Callable[[Any], Any]]]] = {}
        self.run_number = 1
        self.history_length = 0
        self.history_limit = limits_of(None).max_history_events
        self.cancelled = False
        #: set while a retry replays the kept history: the state whose tables the commands rebuild
        self.restoring: Optional[JSONDict] = None
        self.conditions: list[tuple[Callable[[], bool], _Future, Optional[str]]] = []
        sandbox = definition.sandbox
        self.sandbox_guard: Callable[[], Any] = sandbox if sandbox is not None else nullcontext
        self._pause: Callable[[], Any] = getattr(sandbox, "paused", nullcontext) if sandbox is not None else nullcontext

    # -- commands: replay checks them against history, live mode records them ------------------
    def _issue(self, kind: str, name: str, live: Callable[[], Any],
               restore: Optional[Callable[[JSONDict, Any], None]] = None) -> Any:
        n = self.cursor
        self.cursor += 1
        if not self.live:
            rec = self.recorded[n] if n < len(self.recorded) else None
            if rec is None or rec[0] != kind or (rec[1] is not None and rec[1] != name):
                raise ReplayMismatch(n, describe(rec), describe([kind, name]))
            if restore is not None and self.restoring is not None and not isinstance(rec[2], dict):
                restore(self.restoring, rec[2])  # a retry rebuilds the state entry the command made
            return rec[2]
        try:
            value = live()
        except LimitExceeded as e:  # recorded, so replay raises it at the same point
            value = {"$error": ["LimitExceeded", e.message]}
        self.recorded.append([kind, name, value])
        return value

    def _live_run(self) -> Run:
        if self.run is None:
            # A parked coroutine being closed (evicted, or its instance ended) runs its ``finally``
            # blocks; a ctx operation there must not do anything, so end the close quietly.
            raise GeneratorExit
        return self.run

    def schedule_activity(self, name: str, input_: Any, queue: str, policy: Optional[JSONDict] = None,
                          local: bool = False, priority: Optional[int] = None,
                          fairness_key: Optional[str] = None) -> _Future:
        input_ = as_json(input_, f"the input of activity '{name}'")

        def live() -> str:
            run = self._live_run()
            aid = f"{name}-{run.next_seq()}"
            activities.schedule(run, aid, name, queue, input_, "code", name, policy, local=local, priority=priority,
                                fairness_key=fairness_key)
            return aid

        def restore(st: JSONDict, aid: str) -> None:
            act: JSONDict = {"name": name, "queue": queue, "attempt": 1, "thread": "code", "step": name,
                             "input": input_, "phase": "scheduled", "timers": {}}
            if policy is not None:
                act["policy"] = policy
            if local:
                act["local"] = True
            if priority is not None:
                act[PRIORITY] = priority
            if fairness_key is not None:
                act[activities.FAIRNESS_KEY] = fairness_key
            st["activities"][aid] = act

        aid = self._issue("activity", name, live, restore)
        fut = _Future()
        if isinstance(aid, dict):
            fut.set_error(WorkflowError(aid["$error"][1], type=aid["$error"][0]))
        else:
            self.ops[aid] = ("activity:" + name, fut)
        return fut

    def _timer(self, ms: int, purpose: str) -> str:
        def live() -> str:
            return activities.start_timer(self._live_run(), "code", self.now + ms, purpose)

        def restore(st: JSONDict, tid: str) -> None:
            st["timers"][tid] = {"due": self.now + ms, "thread": "code", "purpose": purpose}

        tid = self._issue("timer", purpose, live, restore)
        if isinstance(tid, dict):
            raise WorkflowError(tid["$error"][1], type=tid["$error"][0])
        return str(tid)

    def start_timer(self, ms: int, purpose: str) -> _Future:
        tid = self._timer(ms, purpose)
        fut = _Future()
        self.ops[tid] = ("sleep", fut)
        return fut

    def wait_signal(self, name: str, timeout_ms: Optional[int]) -> _Future:
        fut = _Future()
        buffered = self.signal_buffer.get(name)
        if buffered:
            fut.set_result(buffered.pop(0))
            return fut
        tid = self._timer(timeout_ms, f"signal:{name}") if timeout_ms is not None else None
        if tid is not None:
            self.ops[tid] = ("signal:" + name, fut)
        self.signal_waiters.setdefault(name, []).append((fut, tid))
        return fut

    def start_child(self, workflow: str, input_: Any, child_id: Optional[str], version: Optional[int]) -> _Future:
        fut = _Future()
        input_ = as_json(input_, f"the input of child workflow '{workflow}'")

        def live() -> Any:
            run = self._live_run()
            v = version if version is not None else run.defs.latest(workflow)
            if v is None or run.defs.get(workflow, v) is None:
                return None
            cid = child_id or f"{self.instance_id}:{workflow}-{run.next_seq()}"
            run.record(ChildStarted(child_id=cid, workflow=workflow, version=v, input=input_))
            run.state["children"][cid] = {"thread": "code", "step": workflow}
            run.send(StartWorkflow(workflow=workflow, version=v, input=input_, parent_id=self.instance_id,
                                   parent_ref=cid, id_reuse=None, priority=run.priority()), cid)
            return cid

        def restore(st: JSONDict, cid: Any) -> None:
            if cid is not None:
                st["children"][cid] = {"thread": "code", "step": workflow}

        cid = self._issue("child", workflow, live, restore)
        if isinstance(cid, dict):
            fut.set_error(WorkflowError(cid["$error"][1], type=cid["$error"][0]))
        elif cid is None:
            what = workflow if version is None else f"{workflow}@{version}"
            fut.set_error(WorkflowError(f"no deployed workflow named '{what}'", type="UnknownWorkflow"))
        else:
            self.ops[cid] = ("child:" + workflow, fut)
        return fut

    def side_effect(self, fn: Callable[[], Any]) -> _Future:
        def live() -> Any:
            with self._pause():
                value = fn()
            return as_json(value, "a side effect's value")

        fut = _Future()
        fut.set_result(self._issue("side_effect", "", live))
        return fut

    def set_priority(self, level: Union[str, int], reason: str) -> None:
        number = priority_level(level)
        if number is None:
            raise ValueError("a priority level is needed: critical, high, normal, low, background or 1-5")

        def live() -> Any:
            run = self._live_run()
            # Work this decision still dispatches already takes the new level; the command makes
            # it history (PriorityChanged), which sets the same level when the engine applies it.
            run.state[PRIORITY] = number
            run.send(SetPriority(priority=number, reason=reason or "ctx.set_priority"), self.instance_id)
            return number

        self._issue("set_priority", str(number), live)

    def patched(self, change_id: str) -> bool:
        if change_id in self.patches:
            return self.patches[change_id]
        if self.live:
            self._issue("patch", change_id, lambda: True)
            found = True
        else:
            rec = self.recorded[self.cursor] if self.cursor < len(self.recorded) else None
            found = rec is not None and rec[0] == "patch" and rec[1] == change_id
            if found:
                self.cursor += 1
        self.patches[change_id] = found
        return found

    def wait_condition(self, predicate: Callable[[], bool], timeout_ms: Optional[int]) -> _Future:
        fut = _Future()
        if predicate():
            fut.set_result(None)
            return fut
        tid = self._timer(timeout_ms, "condition") if timeout_ms is not None else None
        if tid is not None:
            self.ops[tid] = ("condition", fut)
        self.conditions.append((predicate, fut, tid))
        return fut

    def _check_conditions(self) -> None:
        for entry in list(self.conditions):
            predicate, fut, tid = entry
            if fut.done:
                self.conditions.remove(entry)
            elif predicate():
                self.conditions.remove(entry)
                if tid is not None:
                    self.ops.pop(tid, None)
                    if self.live:
                        self._live_run().state["timers"].pop(tid, None)
                    elif self.restoring is not None:
                        self.restoring["timers"].pop(tid, None)
                fut.set_result(None)

    def call_signal_handler(self, name: str, data: Any) -> None:
        result = self.signal_handlers[name](data)
        if isinstance(result, Coroutine):
            self._spawn(result)

    def call_update_handler(self, update_id: str, name: str, data: Any) -> None:
        """Run the handler of an accepted update; its answer is recorded when it returns."""
        entry = self.update_handlers.get(name)
        if entry is None:  # validation saw one; only a handler removed since can get here
            self._update_done(update_id, {"error": {"type": "UnknownUpdate",
                                                    "message": f"no handler for update '{name}'"}})
            return
        try:
            with self.sandbox_guard():
                result = entry[0](data)
        except ContinueAsNew:
            self._update_done(update_id, {"error": {"type": "InvalidUpdateHandler", "message": (
                f"update handler '{name}' called continue_as_new; only the workflow's run may")}})
            return
        except Exception as e:  # the handler's error is the caller's answer, not the workflow's
            self._update_done(update_id, error_answer(e))
            return
        if isinstance(result, Coroutine):
            task = _Task(result)
            self.ready.append(task)
            task.future.on_done(lambda: self._update_done(
                update_id, error_answer(task.future.error) if task.future.error is not None
                else result_answer(task.future.value, name)))
        else:
            self._update_done(update_id, result_answer(result, name))

    def _update_done(self, update_id: str, answer: JSONDict) -> None:
        # Only a live machine answers: a replayed handler finished in a decision already recorded.
        if self.live and self.run is not None:
            self.run.answer_update(update_id, answer)

    def compensation_done(self, failed: bool) -> None:
        if self.live:
            self._live_run().state["compensation"] = "failed" if failed else "completed"

    def upsert_search(self, attributes: JSONDict) -> None:
        if self.live:
            search = self._live_run().state.setdefault("search", {})
            for k, v in attributes.items():
                if v is None:
                    search.pop(k, None)
                else:
                    search[k] = v

    def cancel(self) -> None:
        """Fail every pending operation with :class:`CancelledError` (in the order they were issued)."""
        self.cancelled = True
        ops, self.ops = self.ops, {}
        for _label, fut in ops.values():
            fut.set_error(CancelledError())
        conditions, self.conditions = self.conditions, []
        for _p, fut, _tid in conditions:
            fut.set_error(CancelledError())
        waiters, self.signal_waiters = self.signal_waiters, {}
        for name in waiters:
            for fut, _tid in waiters[name]:
                fut.set_error(CancelledError())

    def entropy(self) -> bytes:
        self.draws += 1
        return hashlib.sha256(f"{self.seed}|{self.draws}".encode()).digest()

    def gather(self, aws: tuple[Awaitable[Any], ...]) -> _Future:
        futures = [a if isinstance(a, _Future) else self._spawn(a) for a in aws]
        out = _Future()
        if not futures:
            out.set_result([])
            return out
        pending = [len(futures)]

        def one_done(f: _Future) -> None:
            if f.error is not None:
                out.set_error(f.error)
                return
            pending[0] -= 1
            if pending[0] == 0:
                out.set_result([x.value for x in futures])

        for f in futures:
            f.on_done(lambda f=f: one_done(f))  # type: ignore[misc]
        return out

    def _spawn(self, aw: Any) -> _Future:
        if not isinstance(aw, Coroutine):
            raise TypeError(f"ctx.gather accepts ctx operations and coroutines, not {type(aw).__name__}")
        task = _Task(aw)
        self.ready.append(task)
        return task.future

    # -- stepping --------------------------------------------------------------------------------
    def _step(self, task: _Task) -> None:
        try:
            with self.sandbox_guard():
                yielded = task.coro.send(None)
        except StopIteration as stop:
            task.future.set_result(stop.value)
            return
        except (Exception, ContinueAsNew) as e:  # the workflow's own exception decides its outcome
            task.future.set_error(e)
            return
        if not isinstance(yielded, _Future):
            task.coro.close()
            task.future.set_error(TypeError(
                f"workflow code awaited {type(yielded).__name__}; only ctx operations (and coroutines "
                "awaiting them) can be awaited in a workflow"))
            return
        yielded.on_done(lambda: self.ready.append(task))

    def _run_ready(self) -> None:
        while True:
            while self.ready:
                self._step(self.ready.popleft())
                if self.root is not None and self.root.future.done:
                    return
            if not self.conditions:
                return
            with self.sandbox_guard():
                self._check_conditions()
            if not self.ready:
                return

    def deliver(self, type_: str, data: JSONDict, ts: int, seq: int, input_: Any = None) -> None:
        """Resolve what one input event resolves, then run every task until all are blocked."""
        self.now = ts
        if type_ == "WorkflowStarted":
            self.seed = f"{self.instance_id}|{seq}"
            self.root = _Task(self.definition.fn(self.ctx, data.get("input")))
            self.ready.append(self.root)
        elif type_ in ("ActivityCompleted", "ActivityFailed", "ChildCompleted", "ChildFailed"):
            key = data.get("activity_id") or data.get("child_id")
            op = self.ops.pop(key, None) if key is not None else None
            if op is None:
                raise ReplayMismatch(self.cursor, f"a {type_} for '{key}'", "code that never scheduled it")
            label, fut = op
            if type_.endswith("Completed"):
                fut.set_result(data.get("result"))
            else:
                if type_ == "ActivityFailed":
                    fut.set_error(ActivityError(f"activity '{label[9:]}' failed: {data.get('message', '')}",
                                                type=data["error_type"], attempt=data.get("attempt", 0),
                                                activity=label[9:]))
                else:
                    fut.set_error(WorkflowError(f"child workflow {key} failed: {data.get('message', '')}",
                                                type=data["error_type"]))
        elif type_ == "TimerFired":
            op = self.ops.pop(data["timer_id"], None)
            if op is not None:
                label, fut = op
                if label == "sleep":
                    fut.set_result(None)
                elif label == "condition":
                    fut.set_error(WorkflowError("the condition did not become true in time", type="Timeout"))
                else:
                    name = label[7:]
                    waiters = self.signal_waiters.get(name, [])
                    self.signal_waiters[name] = [w for w in waiters if w[0] is not fut]
                    fut.set_error(WorkflowError(f"no signal '{name}' arrived in time", type="Timeout"))
        elif type_ == "CancelRequested":
            self.cancel()
        elif type_ == "UpdateAccepted":
            self.call_update_handler(data["update_id"], data["name"], data.get("data"))
        elif type_ == "SignalReceived" and data["name"] in self.signal_handlers:
            self.call_signal_handler(data["name"], data.get("data"))
        elif type_ == "SignalReceived":
            name = data["name"]
            queue = self.signal_waiters.get(name)
            if queue:
                fut, tid = queue.pop(0)
                if tid is not None:
                    self.ops.pop(tid, None)
                    if self.live:
                        self._live_run().state["timers"].pop(tid, None)
                    elif self.restoring is not None:
                        self.restoring["timers"].pop(tid, None)
                fut.set_result(data.get("data"))
            else:
                self.signal_buffer.setdefault(name, []).append(data.get("data"))
        self._run_ready()

    @property
    def finished(self) -> bool:
        return self.root is not None and self.root.future.done

