"""The code-workflow replayer: drives a Python ``async def`` workflow by deterministic replay.

A code workflow's coroutine is never run by an asyncio loop; :class:`Machine` steps it by hand.
Every ``ctx`` operation either issues a *command* (schedule an activity, start a timer, start a
child, record a side-effect value or a patch marker) or waits on a future that an *input event*
resolves. Commands become the same consequence events and state entries the spec interpreter
writes (``ActivityScheduled`` + a task, ``TimerStarted`` + ``state["timers"]``, ``ChildStarted`` +
``StartWorkflow``), so the deciders in :mod:`kflow.engine.core` handle both kinds alike.

The state of a code instance records its input events (``state["inputs"]``: ``[type, data, ts,
seq]``) and the commands its code issued (``state["commands"]``: ``[kind, name, value]``). A
:class:`ReplayCache` keeps live machines keyed by instance and position, so the common case resumes
a parked coroutine. On a miss (restart, rebalance, eviction) the function is re-run from the start,
fed the first ``state["delivered"]`` inputs, and every command it issues must equal the recorded
one. A mismatch is non-determinism: the instance becomes ``BLOCKED`` with a description, nothing
else changes, and each later input (or the replay timer the block sets) retries the replay, so
deploying fixed code resumes the instance where it stopped.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections import OrderedDict, deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Awaitable, Callable, Coroutine, Generator, Optional

import orjson

from kflow.engine.run import Run
from kflow.model.errors import KflowError, WorkflowError
from kflow.model.messages import Event, JSONDict, Status

#: Instance-state fields owned by this module (persisted names, never reused).
INPUTS, COMMANDS, DELIVERED, BLOCKED_INFO = "inputs", "commands", "delivered", "blocked"

#: Input events a code workflow reacts to; any other input event (e.g. an attempt that started or a
#: recorded heartbeat) is history for the shared deciders only and leaves the coroutine untouched.
WORKFLOW_INPUTS = frozenset({"WorkflowStarted", "ActivityCompleted", "ActivityFailed", "TimerFired",
                             "SignalReceived", "ChildCompleted", "ChildFailed"})

#: Back-off of the timer that retries the replay of a BLOCKED instance: first, cap (ms).
REPLAY_RETRY_MS, REPLAY_RETRY_MAX_MS = 1_000, 300_000


class NondeterminismError(KflowError):
    """Workflow code issued a different command than its history recorded at ``event_index``."""

    def __init__(self, instance_id: str, event_index: int, expected: str, actual: str) -> None:
        self.instance_id, self.event_index, self.expected, self.actual = instance_id, event_index, expected, actual
        super().__init__(f"instance {instance_id}: non-deterministic workflow code at command #{event_index}: "
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


#: Code workflows registered in this process by ``@kflow.workflow`` (name, version) -> definition.
REGISTRY: dict[tuple[str, int], CodeDefinition] = {}


def register(d: CodeDefinition) -> CodeDefinition:
    REGISTRY[(d.name, d.version)] = d
    return d


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


class _Mismatch(BaseException):
    """Raised through workflow code (a BaseException, so ``except Exception`` cannot swallow it)."""

    def __init__(self, index: int, expected: str, actual: str) -> None:
        self.index, self.expected, self.actual = index, expected, actual
        super().__init__(f"#{index}: expected {expected}, actual {actual}")


def _describe(entry: Optional[list[Any]]) -> str:
    if entry is None:
        return "no further command"
    kind, name = entry[0], entry[1]
    return {"activity": f"activity '{name}'", "timer": f"timer ({name})", "child": f"child workflow '{name}'",
            "side_effect": "side effect", "patch": f"patch marker '{name}'"}.get(kind, f"{kind} '{name}'")


def _json(value: Any, what: str) -> Any:
    """``value`` as the JSON document it becomes on the wire; raises TypeError into workflow code."""
    try:
        return orjson.loads(orjson.dumps(value))
    except TypeError as e:
        raise TypeError(f"{what} must be JSON-serialisable: {e}") from None


def _ms(duration: float | timedelta) -> int:
    seconds = duration.total_seconds() if isinstance(duration, timedelta) else float(duration)
    if seconds < 0:
        raise ValueError(f"expected a non-negative duration, but got {seconds}s")
    return int(seconds * 1000)


# -- the context handed to workflow code ---------------------------------------------------------
class WorkflowContext:
    """What a code workflow may do. Every method is deterministic under replay."""

    def __init__(self, machine: "Machine") -> None:
        self._m = machine

    @property
    def instance_id(self) -> str:
        return self._m.instance_id

    @property
    def workflow(self) -> str:
        return self._m.definition.name

    @property
    def is_replaying(self) -> bool:
        """True while the machine is re-running recorded history (e.g. to skip logging)."""
        return not self._m.live

    def activity(self, name: str, input: Any = None, queue: str = "default") -> Awaitable[Any]:
        """Schedule activity ``name`` now; await the result (raises :class:`WorkflowError` on failure)."""
        return self._m.schedule_activity(name, input, queue)

    def gather(self, *aws: Awaitable[Any]) -> Awaitable[list[Any]]:
        """Await several operations or coroutines concurrently; results in argument order."""
        return self._m.gather(aws)

    def sleep(self, duration: float | timedelta) -> Awaitable[None]:
        """A durable timer: seconds (float) or a ``timedelta``."""
        return self._m.start_timer(_ms(duration), "sleep")

    def wait_signal(self, name: str, timeout: float | timedelta | None = None) -> Awaitable[Any]:
        """The data of the next signal ``name`` (buffered ones first); raises ``WorkflowError(type="Timeout")``."""
        return self._m.wait_signal(name, None if timeout is None else _ms(timeout))

    def child(self, workflow: str, input: Any = None, id: Optional[str] = None,
              version: Optional[int] = None) -> Awaitable[Any]:
        """Start child workflow ``workflow`` (code or spec); await its result."""
        return self._m.start_child(workflow, input, id, version)

    def now(self) -> datetime:
        """The time of the input event being processed (UTC), identical on replay."""
        return datetime.fromtimestamp(self._m.now / 1000, tz=timezone.utc)

    def random(self) -> float:
        """A float in [0, 1) from a generator seeded by the instance; the same sequence on replay."""
        return int.from_bytes(self._m.entropy()[:8], "big") / 2**64

    def uuid4(self) -> uuid.UUID:
        """A version-4 UUID from the instance's seeded generator."""
        return uuid.UUID(bytes=self._m.entropy()[:16], version=4)

    def side_effect(self, fn: Callable[[], Any]) -> Awaitable[Any]:
        """Run ``fn`` once (outside the sandbox); its JSON result is recorded and returned on replay."""
        return self._m.side_effect(fn)

    def patched(self, change_id: str) -> bool:
        """True for instances that reached this point after the change was deployed."""
        return self._m.patched(change_id)

    def set_query_handler(self, name: str, fn: Callable[..., Any]) -> None:
        """Answer query ``name`` with ``fn(*args)``: a read-only view of the workflow's variables."""
        self._m.queries[name] = fn


# -- the machine ---------------------------------------------------------------------------------
class Machine:
    """One live workflow coroutine plus the futures it waits on."""

    def __init__(self, definition: CodeDefinition, instance_id: str, recorded: list[list[Any]]) -> None:
        self.definition = definition
        self.instance_id = instance_id
        self.ctx = WorkflowContext(self)
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
        sandbox = definition.sandbox
        self._guard: Callable[[], Any] = sandbox if sandbox is not None else nullcontext
        self._pause: Callable[[], Any] = getattr(sandbox, "paused", nullcontext) if sandbox is not None else nullcontext

    # -- commands: replay checks them against history, live mode records them ------------------
    def _issue(self, kind: str, name: str, live: Callable[[], Any]) -> Any:
        n = self.cursor
        self.cursor += 1
        if not self.live:
            rec = self.recorded[n] if n < len(self.recorded) else None
            if rec is None or rec[0] != kind or (rec[1] is not None and rec[1] != name):
                raise _Mismatch(n, _describe(rec), _describe([kind, name]))
            return rec[2]
        value = live()
        self.recorded.append([kind, name, value])
        return value

    def _live_run(self) -> Run:
        assert self.run is not None
        return self.run

    def schedule_activity(self, name: str, input_: Any, queue: str) -> _Future:
        input_ = _json(input_, f"the input of activity '{name}'")

        def live() -> str:
            run = self._live_run()
            aid = f"{name}-{run.next_seq()}"
            run.emit("ActivityScheduled", {"activity_id": aid, "name": name, "queue": queue, "input": input_,
                                            "attempt": 1})
            run.state["activities"][aid] = {"name": name, "queue": queue, "attempt": 1, "thread": "code",
                                            "step": name, "phase": "scheduled", "timers": {}}
            run.task(aid, name, queue, input_, 1, run.state["workflow"])
            return aid

        aid = self._issue("activity", name, live)
        fut = _Future()
        self.ops[aid] = ("activity:" + name, fut)
        return fut

    def _timer(self, ms: int, purpose: str) -> str:
        def live() -> str:
            run = self._live_run()
            tid = f"t{run.next_seq()}"
            due = self.now + ms
            run.emit("TimerStarted", {"timer_id": tid, "due_ms": due})
            run.state["timers"][tid] = {"due": due, "thread": "code", "purpose": purpose}
            return tid

        return str(self._issue("timer", purpose, live))

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
        input_ = _json(input_, f"the input of child workflow '{workflow}'")

        def live() -> Any:
            run = self._live_run()
            v = version if version is not None else run.defs.latest(workflow)
            if v is None or run.defs.get(workflow, v) is None:
                return None
            cid = child_id or f"{self.instance_id}:{workflow}-{run.next_seq()}"
            run.emit("ChildStarted", {"child_id": cid, "workflow": workflow, "version": v, "input": input_})
            run.state["children"][cid] = {"thread": "code", "step": workflow}
            run.command("StartWorkflow", cid, {"workflow": workflow, "version": v, "input": input_,
                                               "parent_id": self.instance_id, "parent_ref": cid, "id_reuse": None})
            return cid

        cid = self._issue("child", workflow, live)
        if cid is None:
            what = workflow if version is None else f"{workflow}@{version}"
            fut.set_error(WorkflowError(f"no deployed workflow named '{what}'", type="UnknownWorkflow"))
        else:
            self.ops[cid] = ("child:" + workflow, fut)
        return fut

    def side_effect(self, fn: Callable[[], Any]) -> _Future:
        def live() -> Any:
            with self._pause():
                value = fn()
            return _json(value, "a side effect's value")

        fut = _Future()
        fut.set_result(self._issue("side_effect", "", live))
        return fut

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
            with self._guard():
                yielded = task.coro.send(None)
        except StopIteration as stop:
            task.future.set_result(stop.value)
            return
        except Exception as e:  # the workflow's own exception decides its outcome
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
        while self.ready:
            self._step(self.ready.popleft())
            if self.root is not None and self.root.future.done:
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
            op = self.ops.pop(key, None)
            if op is None:
                raise _Mismatch(self.cursor, f"a {type_} for '{key}'", "code that never scheduled it")
            label, fut = op
            if type_.endswith("Completed"):
                fut.set_result(data.get("result"))
            else:
                what = f"activity '{label[9:]}'" if type_ == "ActivityFailed" else f"child workflow {key}"
                fut.set_error(WorkflowError(f"{what} failed: {data.get('message', '')}", type=data["error_type"]))
        elif type_ == "TimerFired":
            op = self.ops.pop(data["timer_id"], None)
            if op is not None:
                label, fut = op
                if label == "sleep":
                    fut.set_result(None)
                else:
                    name = label[7:]
                    waiters = self.signal_waiters.get(name, [])
                    self.signal_waiters[name] = [w for w in waiters if w[0] is not fut]
                    fut.set_error(WorkflowError(f"no signal '{name}' arrived in time", type="Timeout"))
        elif type_ == "SignalReceived":
            name = data["name"]
            waiters = self.signal_waiters.get(name)
            if waiters:
                fut, tid = waiters.pop(0)
                if tid is not None:
                    self.ops.pop(tid, None)
                    if self.live:
                        self._live_run().state["timers"].pop(tid, None)
                fut.set_result(data.get("data"))
            else:
                self.signal_buffer.setdefault(name, []).append(data.get("data"))
        self._run_ready()

    @property
    def finished(self) -> bool:
        return self.root is not None and self.root.future.done


# -- the cache of live machines ------------------------------------------------------------------
class ReplayCache:
    """A bounded LRU of live machines, keyed by instance and the exact position they reflect.

    A machine is taken out while it is used, so a stale machine (e.g. one advanced inside an
    aborted transaction) is never resumed: its key no longer matches the committed state and the
    instance is rebuilt by replay instead. A lock keeps the table consistent when several engines
    share a process (tests, the dev stack); each instance belongs to one engine at a time.
    """

    def __init__(self, max_size: int = 10_000) -> None:
        self.max_size = max_size
        self._items: OrderedDict[str, tuple[tuple[Any, ...], Machine]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def take(self, instance_id: str, key: tuple[Any, ...]) -> Optional[Machine]:
        with self._lock:
            item = self._items.pop(instance_id, None)
        if item is not None and item[0] == key:
            self.hits += 1
            return item[1]
        self.misses += 1
        return None

    def put(self, instance_id: str, key: tuple[Any, ...], machine: Machine) -> None:
        if self.max_size <= 0:
            return
        with self._lock:
            self._items[instance_id] = (key, machine)
            self._items.move_to_end(instance_id)
            while len(self._items) > self.max_size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


#: The process-wide cache; ``CACHE.max_size = 0`` disables it (every input then replays).
CACHE = ReplayCache()


def _key(seq: int, st: JSONDict) -> tuple[Any, ...]:
    """Where a machine stands: the instance's seq, history sizes and the last input delivered."""
    inputs = st[INPUTS]
    return (seq, len(inputs), len(st[COMMANDS]), inputs[-1] if inputs else None)


# -- the entry point called by core.evolve -------------------------------------------------------
def apply_input(run: Run, ev: Event) -> None:
    """Deliver one input event to a code workflow, replaying its history first when needed."""
    st = run.state
    definition: Optional[CodeDefinition] = run.compiled
    if ev.type == "WorkflowStarted":
        st[INPUTS], st[COMMANDS], st[DELIVERED] = [], [], 0
    # core has already stamped the state with this event's seq; the machine was parked one before.
    prev_key = _key(ev.seq - 1, st) if st[INPUTS] else None
    if ev.type not in WORKFLOW_INPUTS:
        parked = CACHE.take(st["id"], prev_key) if prev_key is not None else None
        if parked is not None:
            CACHE.put(st["id"], _key(st["seq"], st), parked)
        return
    replay_timer = False
    d = ev.data
    if ev.type in ("ActivityCompleted", "ActivityFailed"):
        st["activities"].pop(d["activity_id"], None)
    elif ev.type in ("ChildCompleted", "ChildFailed"):
        st["children"].pop(d["child_id"], None)
    elif ev.type == "TimerFired":
        timer = st["timers"].pop(d["timer_id"], None)
        replay_timer = timer is not None and timer.get("purpose") == "replay"
    if not replay_timer:
        st[INPUTS].append([ev.type, d, ev.ts, ev.seq])
    if definition is None:
        _block(run, NondeterminismError(st["id"], st[DELIVERED], f"code workflow '{st['workflow']}@{st['version']}'",
                                        "no such workflow registered in this engine"))
        return

    machine = None
    if st["status"] == Status.RUNNING and prev_key is not None:
        machine = CACHE.take(st["id"], prev_key)
    if machine is None:
        machine = Machine(definition, st["id"], st[COMMANDS])
        try:
            for type_, data, ts, seq in st[INPUTS][:st[DELIVERED]]:
                machine.deliver(type_, data, ts, seq)
                if machine.finished:
                    raise _Mismatch(machine.cursor, _describe(st[COMMANDS][machine.cursor]
                                                              if machine.cursor < len(st[COMMANDS]) else None)
                                    + " or a wait for input", _outcome(machine))
            if machine.cursor != len(st[COMMANDS]):
                raise _Mismatch(machine.cursor, _describe(st[COMMANDS][machine.cursor]), "no further command")
        except _Mismatch as m:
            _block(run, NondeterminismError(st["id"], m.index, m.expected, m.actual))
            return
        if st["status"] == Status.BLOCKED:
            _unblock(st)
    machine.live, machine.run, machine.recorded = True, run, st[COMMANDS]
    for type_, data, ts, seq in st[INPUTS][st[DELIVERED]:]:
        machine.deliver(type_, data, ts, seq)
        if machine.finished:
            break
    st[DELIVERED] = len(st[INPUTS])
    machine.run = None
    if machine.finished:
        _finish(run, machine)
    else:
        CACHE.put(st["id"], _key(st["seq"], st), machine)


def query(definition: CodeDefinition, state: JSONDict, name: str, *args: Any) -> Any:
    """Rebuild an instance's coroutine from its state by replay and call its query handler ``name``.

    Runs wherever the workflow's code is importable (a client, a console), on the ``internal``
    state of the instance's ``state`` record; it never changes the instance.
    """
    machine = Machine(definition, state["id"], state[COMMANDS])
    try:
        for type_, data, ts, seq in state[INPUTS][:state[DELIVERED]]:
            machine.deliver(type_, data, ts, seq)
            if machine.finished:
                break
    except _Mismatch as m:
        raise NondeterminismError(state["id"], m.index, m.expected, m.actual) from None
    handler = machine.queries.get(name)
    if handler is None:
        known = ", ".join(sorted(machine.queries)) or "none"
        raise KflowError(f"workflow '{definition.name}' has no query '{name}' (registered: {known})")
    with machine._guard():
        value = handler(*args)
    return _json(value, f"the answer to query '{name}'")


def _outcome(machine: Machine) -> str:
    assert machine.root is not None
    err = machine.root.future.error
    return "workflow completion" if err is None else f"workflow failure ({type(err).__name__}: {err})"


def _finish(run: Run, machine: Machine) -> None:
    assert machine.root is not None
    fut = machine.root.future
    if fut.error is None:
        try:
            result = orjson.loads(orjson.dumps(fut.value))
        except TypeError as e:
            run.fail("InvalidResult", f"workflow result is not JSON: {e}")
            return
        run.complete(result)
    else:
        e = fut.error
        run.fail(getattr(e, "type", None) or type(e).__name__, str(getattr(e, "message", None) or e))


def _block(run: Run, err: NondeterminismError) -> None:
    """Park the instance: BLOCKED with a description and a timer that retries the replay."""
    st = run.state
    attempts = (st.get(BLOCKED_INFO) or {}).get("attempts", 0) + 1
    st["status"] = Status.BLOCKED
    st[BLOCKED_INFO] = {"seq": st["seq"], "index": err.event_index, "expected": err.expected,
                        "actual": err.actual, "message": str(err), "attempts": attempts}
    if not any(t.get("purpose") == "replay" for t in st["timers"].values()):
        delay = min(REPLAY_RETRY_MS * 2 ** (attempts - 1), REPLAY_RETRY_MAX_MS)
        st["timers"][f"replay-{st['seq']}"] = {"due": run.now + delay, "thread": "code", "purpose": "replay"}


def _unblock(st: JSONDict) -> None:
    st["status"] = Status.RUNNING
    st.pop(BLOCKED_INFO, None)
    for tid in [t for t, v in st["timers"].items() if v.get("purpose") == "replay"]:
        del st["timers"][tid]
