"""The spec interpreter: runs a spec workflow's threads until each is blocked or finished.

Execution state is a set of *threads* in the instance state. The root thread walks the top-level
step list; ``parallel`` and ``foreach`` start one child thread per branch/item and park their own
thread on a *join*. A thread blocks on an activity, a timer, a signal or a child workflow; the
matching input event (``ActivityCompleted``, ``TimerFired``, ``SignalReceived``,
``ChildCompleted``) unblocks it. Everything is keyed by ids derived from sequence numbers, and
threads run in a deterministic order, so replaying the same input events reproduces the same
events and state exactly. An error in a step (a final activity failure or timeout, a failed child,
a wait timeout) takes the step's matching ``catch`` route or propagates to the enclosing
``parallel``/``foreach`` step; uncaught, it fails the workflow, after running the recorded saga
compensations newest first. A task step's ``on_failure`` comes between the two: when no catch
route takes the error, the step is skipped with an output (``StepSkipped``) or its thread waits
on an *incident* (``IncidentRaised``, status INCIDENT) until an operator resolves it
(``IncidentResolved``: run the step again, skip it, or fail the workflow) or its timeout fails
the workflow. Attempts, retries and timeouts live in :mod:`kflow.engine.activity`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional, cast

from kflow.engine import activity, incidents
from kflow.engine.activity import COMPENSATE_PREFIX, LimitExceeded
from kflow.engine.definitions import CompiledSpec
from kflow.engine.expr import ExpressionError, evaluate
from kflow.engine.run import AT_SAFE_POINT, INCIDENTS, PENDING_MIGRATION, Run
from kflow.model.commands import CancelWorkflow, StartWorkflow
from kflow.model.errors import WorkflowError
from kflow.model.events import (
    ActivityCompleted,
    ActivityFailed,
    ActivityStarted,
    AnyEvent,
    CancelRequested,
    ChildCompleted,
    ChildFailed,
    ChildStarted,
    HeartbeatRecorded,
    IncidentResolved,
    SignalReceived,
    StepSkipped,
    TimerFired,
    UpdateAccepted,
    WorkflowRetried,
    WorkflowStarted,
)
from kflow.model.messages import Event, JSONDict, Status
from kflow.model.spec import Step, parse_duration_ms

BLOCK = False
NEXT = True

#: Steps one decision may run before the workflow fails with ``StepLimitExceeded``: a goto loop
#: that never blocks would otherwise spin forever inside ``decide`` and stall its partition.
#: A count, not a time budget, so replay reaches the same verdict.
MAX_STEPS_PER_DECISION = 100_000


# -- threads and scopes ---------------------------------------------------------------------
def new_thread(run: Run, list_key: str, parent: Optional[str], slot: int, local: JSONDict) -> str:
    st = run.state
    tid = str(st["next_tid"])
    st["next_tid"] += 1
    st["threads"][tid] = {"list": list_key, "idx": 0, "vars": local, "parent": parent, "slot": slot,
                          "wait": None, "last": None}
    run.runnable.append(tid)
    return tid


def scope(run: Run, th: JSONDict) -> JSONDict:
    """Variables visible to a thread: input, workflow variables, then enclosing branch locals."""
    return scope_in(run.state, th)


def scope_in(st: JSONDict, th: JSONDict) -> JSONDict:
    """:func:`scope` over an instance state (for checks made before any event, e.g. an update's)."""
    chain = []
    t: Optional[JSONDict] = th
    while t is not None:
        chain.append(t["vars"])
        t = st["threads"].get(t["parent"]) if t["parent"] is not None else None
    out: JSONDict = {"input": st["input"]}
    out.update(st["vars"])
    for layer in reversed(chain):
        out.update(layer)
    return out


def assign(run: Run, th: JSONDict, name: Optional[str], value: Any) -> None:
    th["last"] = value
    if name:
        (run.state["vars"] if th["parent"] is None else th["vars"])[name] = value


def step_of(c: CompiledSpec, th: JSONDict) -> Step:
    return c.lists[th["list"]][th["idx"]]


# -- step handlers: each returns NEXT (thread keeps running) or BLOCK -----------------------------
def _set(run: Run, tid: str, th: JSONDict, step: Step) -> bool:
    values = {}
    sc = scope(run, th)
    for name, src in (step.set or {}).items():
        values[name] = evaluate(src, sc)
    for name, v in values.items():
        assign(run, th, name, v)
    th["last"] = values
    th["idx"] += 1
    return NEXT


def _task(run: Run, tid: str, th: JSONDict, step: Step) -> bool:
    input_ = evaluate(step.input, scope(run, th)) if step.input else None
    aid = f"{step.id}-{run.next_seq()}"
    activity.schedule(run, aid, step.task or "", step.queue, input_, tid, step.id, local=step.local,
                      priority=step.priority, fairness_key=_fairness_key(run, th, step))
    th["wait"] = {"k": "activity", "id": aid}
    return BLOCK


def _fairness_key(run: Run, th: JSONDict, step: Step) -> Optional[str]:
    """The step's ``fairness_key`` evaluated now (a string or number); None without one."""
    if step.fairness_key is None:
        return None
    value = evaluate(step.fairness_key, scope(run, th))
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ExpressionError(step.fairness_key, f"fairness_key: expected a string or number, but got {value!r}")
    return str(value)


def _goto(run: Run, th: JSONDict, target: str) -> None:
    th["idx"] = run.compiled.where[target][1]


def _choice(run: Run, tid: str, th: JSONDict, step: Step) -> bool:
    sc = scope(run, th)
    for rule in step.choice or []:
        if evaluate(rule.when, sc) is True:
            _goto(run, th, rule.goto)
            return NEXT
    if step.otherwise:
        _goto(run, th, step.otherwise)
    else:
        th["idx"] += 1
    return NEXT


def _parallel(run: Run, tid: str, th: JSONDict, step: Step) -> bool:
    branches = step.parallel or []
    th["wait"] = {"k": "join", "results": [None] * len(branches), "pending": len(branches), "items": None, "next": 0}
    for i in range(len(branches)):
        new_thread(run, f"{step.id}.{i}", tid, i, {})
    return BLOCK


def _foreach(run: Run, tid: str, th: JSONDict, step: Step) -> bool:
    items = evaluate(step.foreach or "", scope(run, th))
    if not isinstance(items, list):
        raise ExpressionError(step.foreach or "", f"foreach expects a list, but got {type(items).__name__}")
    if not items:
        assign(run, th, step.output, [])
        th["idx"] += 1
        return NEXT
    limit = step.concurrency or len(items)
    th["wait"] = {"k": "join", "results": [None] * len(items), "pending": len(items), "items": items, "next": 0}
    for _ in range(min(limit, len(items))):
        _start_item(run, tid, th, step)
    return BLOCK


def _start_item(run: Run, tid: str, th: JSONDict, step: Step) -> None:
    join = th["wait"]
    i = join["next"]
    join["next"] += 1
    new_thread(run, step.id, tid, i, {step.as_: join["items"][i]})


def _timer(run: Run, tid: str, due: int, purpose: str) -> str:
    return activity.start_timer(run, tid, due, purpose)


def _wait(run: Run, tid: str, th: JSONDict, step: Step) -> bool:
    assert step.wait is not None
    if step.wait.update is not None:  # updates are not buffered: one arriving while none waits is rejected
        timer = None
        if step.wait.timeout is not None:
            timer = _timer(run, tid, run.now + parse_duration_ms(step.wait.timeout), "wait_timeout")
        th["wait"] = {"k": "update", "name": step.wait.update, "timer": timer}
        return BLOCK
    name = step.wait.signal
    buffered = run.state["signals"].get(name)
    if buffered:
        data = buffered.pop(0)
        if not buffered:
            del run.state["signals"][name]
        assign(run, th, step.output, data)
        th["idx"] += 1
        return NEXT
    timer = None
    if step.wait.timeout is not None:
        timer = _timer(run, tid, run.now + parse_duration_ms(step.wait.timeout), "wait_timeout")
    th["wait"] = {"k": "signal", "name": name, "timer": timer}
    return BLOCK


def _sleep(run: Run, tid: str, th: JSONDict, step: Step) -> bool:
    timer = _timer(run, tid, run.now + parse_duration_ms(step.sleep), "sleep")  # type: ignore[arg-type]
    th["wait"] = {"k": "timer", "id": timer}
    return BLOCK


def _child(run: Run, tid: str, th: JSONDict, step: Step) -> bool:
    spec = step.child
    assert spec is not None
    sc = scope(run, th)
    input_ = evaluate(spec.input, sc) if spec.input else None
    child_id = str(evaluate(spec.id, sc)) if spec.id else f"{run.instance_id}:{step.id}-{run.next_seq()}"
    version = spec.version if spec.version is not None else run.defs.latest(spec.workflow)
    if version is None or run.defs.get(spec.workflow, version) is None:
        # Checked here, not left to the child's StartWorkflow: that command would go to the DLQ
        # and the parent would wait for a child that never exists.
        what = spec.workflow if spec.version is None else f"{spec.workflow}@{spec.version}"
        fail_workflow(run, "UnknownWorkflow", f"step '{step.id}': no deployed workflow named '{what}'")
        return BLOCK
    activity.check_pending(run, "children")
    activity.check_payload(run, f"the input of child workflow '{spec.workflow}'", input_)
    run.record(ChildStarted(child_id=child_id, workflow=spec.workflow, version=version, input=input_))
    run.state["children"][child_id] = {"thread": tid, "step": step.id}
    run.send(StartWorkflow(workflow=spec.workflow, version=version, input=input_, parent_id=run.instance_id,
                           parent_ref=child_id, id_reuse=None, priority=run.priority()), child_id)
    th["wait"] = {"k": "child", "id": child_id}
    return BLOCK


def _succeed(run: Run, tid: str, th: JSONDict, step: Step) -> bool:
    result = evaluate(step.succeed, scope(run, th)) if step.succeed else dict(run.state["vars"])
    run.complete(result)
    return BLOCK


def _fail(run: Run, tid: str, th: JSONDict, step: Step) -> bool:
    assert step.fail is not None
    message = evaluate(step.fail.message, scope(run, th)) if step.fail.message else ""
    fail_workflow(run, step.fail.error, str(message))
    return BLOCK


HANDLERS: dict[str, Callable[[Run, str, JSONDict, Step], bool]] = {
    "set": _set, "task": _task, "choice": _choice, "parallel": _parallel, "foreach": _foreach,
    "wait": _wait, "sleep": _sleep, "child": _child, "succeed": _succeed, "fail": _fail,
}


# -- the scheduler ----------------------------------------------------------------------------
def run_until_blocked(run: Run) -> None:
    """Advance runnable threads in order until every thread is blocked or the instance closed."""
    c: CompiledSpec = run.compiled
    threads = run.state["threads"]
    budget = MAX_STEPS_PER_DECISION
    while run.runnable and not run.closed:
        tid = run.runnable.pop(0)
        th = threads.get(tid)
        if th is None or th["wait"] is not None:
            continue
        while not run.closed:
            steps = c.lists[th["list"]]
            if th["idx"] >= len(steps):
                _finish_thread(run, tid, th)
                break
            step = steps[th["idx"]]
            budget -= 1
            if budget < 0:
                fail_workflow(run, "StepLimitExceeded", f"step '{step.id}': more than {MAX_STEPS_PER_DECISION} steps "
                         "ran without blocking (a goto loop that never waits?)")
                return
            try:
                if step.search:
                    _upsert_search(run, th, step)
                keep_going = HANDLERS[step.kind](run, tid, th, step)
            except ExpressionError as e:
                fail_workflow(run, "ExpressionError", f"step '{step.id}': {e}")
                return
            except LimitExceeded as e:
                fail_workflow(run, "LimitExceeded", f"step '{step.id}': {e.message}")
                return
            if not keep_going:
                break
            if step.goto and step.kind != "choice":
                _goto(run, th, step.goto)


def _upsert_search(run: Run, th: JSONDict, step: Step) -> None:
    """Evaluate the step's ``search:`` expressions and merge them into the state's ``search`` dict.

    A value of ``null`` removes the attribute. All expressions are evaluated before any is stored.
    """
    sc = scope(run, th)
    values = {name: evaluate(src, sc) for name, src in (step.search or {}).items()}
    search = run.state.setdefault("search", {})
    for name, value in values.items():
        if value is None:
            search.pop(name, None)
        else:
            search[name] = value


def _advance(run: Run, tid: str, th: JSONDict, value: Any) -> None:
    """A blocked thread's step produced ``value``: store it and make the thread runnable."""
    step = step_of(run.compiled, th)
    th["wait"] = None
    assign(run, th, step.output, value)
    th["idx"] += 1
    if step.goto:
        _goto(run, th, step.goto)
    run.runnable.append(tid)


def _finish_thread(run: Run, tid: str, th: JSONDict) -> None:
    if th["parent"] is None:
        run.complete(dict(run.state["vars"]))
        return
    threads = run.state["threads"]
    parent_tid = th["parent"]
    parent = threads[parent_tid]
    join = parent["wait"]
    join["results"][th["slot"]] = th["last"]
    join["pending"] -= 1
    del threads[tid]
    step = step_of(run.compiled, parent)
    if join["items"] is not None and join["next"] < len(join["items"]):
        _start_item(run, parent_tid, parent, step)
    if join["pending"] == 0:
        _advance(run, parent_tid, parent, join["results"])


# -- errors, catch routes and cancellation of pending work --------------------------------------
def fail_workflow(run: Run, error_type: str, message: str) -> None:
    """Fail the instance; with completed compensable steps the saga runs first (see ``begin_compensation``)."""
    if run.state["status"] in (Status.RUNNING, Status.INCIDENT) and run.state.get("compensations"):
        begin_compensation(run, Status.COMPENSATING,
                           {"status": Status.FAILED, "event": "WorkflowFailed",
                            "data": {"error_type": error_type, "message": message}})
    else:
        run.fail(error_type, message)


def _descendants(run: Run, tid: str) -> list[str]:
    threads = run.state["threads"]
    out = []
    for other in sorted(threads, key=int):
        p = threads[other]["parent"]
        while p is not None:
            if p == tid:
                out.append(other)
                break
            p = threads[p]["parent"] if p in threads else None
    return out


def _cancel_wait(run: Run, th: JSONDict, reason: str) -> None:
    """Drop whatever a thread is blocked on (an error elsewhere made its result irrelevant)."""
    w, th["wait"] = th["wait"], None
    if w is None:
        return
    if w["k"] == "activity":
        activity.drop(run, w["id"], cancel=True)
    elif w["k"] == "timer":
        run.state["timers"].pop(w["id"], None)
    elif w["k"] in ("signal", "update") and w["timer"]:
        run.state["timers"].pop(w["timer"], None)
    elif w["k"] == "child":
        run.state["children"].pop(w["id"], None)
        run.send(CancelWorkflow(reason=reason), w["id"])
    elif w["k"] == "incident":
        incidents.close_incident(run, w["id"])


def raise_error(run: Run, tid: str, error_type: str, message: str) -> None:
    """An error in the step ``tid`` is blocked on: take its matching catch route or propagate it.

    Uncaught in a branch, the error cancels the branch's siblings and propagates to the enclosing
    ``parallel``/``foreach`` step; uncaught at the top level it fails the workflow.
    """
    threads = run.state["threads"]
    th = threads[tid]
    step = step_of(run.compiled, th)
    rule = next((r for r in step.catch or [] if r.matches(error_type)), None)
    for other in reversed(_descendants(run, tid)):
        _cancel_wait(run, threads[other], f"step '{step.id}' of {run.instance_id} failed")
        del threads[other]
    if rule is not None:
        _cancel_wait(run, th, f"step '{step.id}' of {run.instance_id} failed")
        assign(run, th, rule.output, {"type": error_type, "message": message})
        _goto(run, th, rule.goto)
        run.runnable.append(tid)
    elif th["parent"] is not None:
        _cancel_wait(run, th, f"step '{step.id}' of {run.instance_id} failed")
        raise_error(run, th["parent"], error_type, message)
    else:
        fail_workflow(run, error_type, message)


# -- sagas ------------------------------------------------------------------------------------
def _record_compensation(run: Run, th: JSONDict, step: Step) -> None:
    comp = step.compensate
    if comp is None:
        return
    input_ = evaluate(comp.input, scope(run, th)) if comp.input else None
    run.state.setdefault("compensations", []).append(
        {"step": step.id, "task": comp.task, "queue": comp.queue, "input": input_})


def begin_compensation(run: Run, status: str, closing: JSONDict) -> None:
    """Stop all normal work and run the recorded compensations, newest first, then close as ``closing``."""
    st = run.state
    for child_id in sorted(st["children"]):
        run.send(CancelWorkflow(reason=f"parent {st['id']} is compensating"), child_id)
    run.cancel_activities()
    for table in ("children", "timers", "threads", "signals"):
        st[table].clear()
    if st.pop(INCIDENTS, None) is not None:
        st["error"] = None
    run.runnable.clear()
    st["status"] = status
    st["closing"] = closing
    st["compensation"] = "running"
    _next_compensation(run)


def _next_compensation(run: Run) -> None:
    st = run.state
    while st["compensations"]:
        comp = st["compensations"].pop()
        aid = f"{COMPENSATE_PREFIX}{comp['step']}-{run.next_seq()}"
        try:
            activity.schedule(run, aid, comp["task"], comp["queue"], comp["input"], None,
                              COMPENSATE_PREFIX + comp["step"])
            return
        except LimitExceeded as e:
            st.setdefault("compensation_errors", []).append(
                {"step": comp["step"], "type": "LimitExceeded", "message": e.message})
    closing = st.pop("closing")
    st["compensation"] = "failed" if st.get("compensation_errors") else "completed"
    run.close(closing["status"], closing["event"], closing["data"])


def _compensation_done(run: Run, act: JSONDict, error: Optional[tuple[str, str]]) -> None:
    if error is not None:
        run.state.setdefault("compensation_errors", []).append(
            {"step": act["step"][len(COMPENSATE_PREFIX):], "type": error[0], "message": error[1]})
    _next_compensation(run)


def on_cancel_requested(run: Run, ev: Event, body: CancelRequested) -> None:
    begin_compensation(run, Status.CANCELLING, {"status": Status.CANCELLED, "event": "WorkflowCancelled",
                                                "data": {"reason": body.reason}})


# -- input events -----------------------------------------------------------------------------
# Each takes the event and its model (built once by ``core.evolve``) and reads the event's fields
# from the model.
def on_started(run: Run, ev: Event, body: WorkflowStarted) -> None:
    new_thread(run, "", None, 0, {})
    timeouts = run.compiled.spec.timeout
    if timeouts is not None and timeouts.execution is not None:
        activity.start_timer(run, None, run.now + parse_duration_ms(timeouts.execution), "execution")


def on_activity_completed(run: Run, ev: Event, body: ActivityCompleted) -> None:
    act = activity.drop(run, body.activity_id)
    assert act is not None
    if act["thread"] is None:
        _compensation_done(run, act, None)
        return
    tid = act["thread"]
    th = run.state["threads"][tid]
    step = step_of(run.compiled, th)
    _advance(run, tid, th, body.result)
    try:
        _record_compensation(run, th, step)
    except ExpressionError as e:
        fail_workflow(run, "ExpressionError", f"step '{step.id}' (compensate input): {e}")


def _activity_error(run: Run, aid: str, error_type: str, message: str) -> None:
    act = activity.drop(run, aid)
    assert act is not None
    if act["thread"] is None:
        _compensation_done(run, act, (error_type, message))
        return
    text = f"activity '{act['name']}' (step '{act['step']}') failed: {message}"
    if not _on_failure(run, aid, act, error_type, text):
        raise_error(run, act["thread"], error_type, text)


# -- on_failure: skip, or an incident an operator resolves ----------------------------------------
def _on_failure(run: Run, aid: str, act: JSONDict, error_type: str, message: str) -> bool:
    """Apply the step's ``on_failure`` to its final error, unless a ``catch`` route takes it first.

    Returns False when the error is to be raised as usual.
    """
    tid = act["thread"]
    th = run.state["threads"][tid]
    step = step_of(run.compiled, th)
    policy = step.on_failure
    if policy is None or any(r.matches(error_type) for r in step.catch or []):
        return False
    error = {"type": error_type, "message": message}
    if policy.skip is not None:
        try:
            output = evaluate(policy.skip.output, {**scope(run, th), "error": error}) if policy.skip.output else None
        except ExpressionError as e:
            fail_workflow(run, "ExpressionError", f"step '{step.id}' (on_failure skip output): {e}")
            return True
        run.record(StepSkipped(step=step.id, activity_id=aid, error_type=error_type, message=message, output=output))
        _advance(run, tid, th, output)
        return True
    assert policy.incident is not None
    incident_id = f"{step.id}-{run.next_seq()}"
    incidents.open_incident(run, incident_id, tid, step.id, aid, act, error_type, message, policy.incident)
    th["wait"] = {"k": "incident", "id": incident_id}
    return True


def on_incident_resolved(run: Run, ev: Event, body: IncidentResolved) -> None:
    """An operator resolved an incident: run its step again, skip it with an output, or fail the workflow.

    A retry schedules the step's activity afresh (a new activity id, a full retry policy) with its
    input updated with ``input_patch``; a skip makes ``output`` the step's output; a fail fails the
    workflow with the step's error.
    """
    inc = incidents.close_incident(run, body.incident_id)
    tid = inc["thread"]
    th = run.state["threads"][tid]
    step = step_of(run.compiled, th)
    th["wait"] = None
    if body.action == "retry":
        aid = f"{step.id}-{run.next_seq()}"
        th["wait"] = {"k": "activity", "id": aid}
        activity.schedule(run, aid, inc["name"], inc["queue"], incidents.patched_input(inc, body.input_patch),
                          tid, step.id, local=step.local, priority=inc["priority"])
    elif body.action == "skip":
        _advance(run, tid, th, body.output)
    else:
        fail_workflow(run, inc["error"]["type"], incidents.fail_message(inc, body.incident_id, body.by, body.reason))


def _incident_timed_out(run: Run, timer: JSONDict) -> None:
    inc, message = incidents.timed_out(run, timer)
    run.state["threads"][inc["thread"]]["wait"] = None
    fail_workflow(run, "IncidentTimeout", message)


def on_activity_failed(run: Run, ev: Event, body: ActivityFailed) -> None:
    if not activity.retry_or_give_up(run, body.activity_id, body.error_type, body.retryable):
        _activity_error(run, body.activity_id, body.error_type, body.message)


def on_activity_started(run: Run, ev: Event, body: ActivityStarted) -> None:
    activity.on_started(run, body.activity_id)


def on_heartbeat(run: Run, ev: Event, body: HeartbeatRecorded) -> None:
    activity.on_heartbeat(run, body.activity_id)


def on_timer_fired(run: Run, ev: Event, body: TimerFired) -> None:
    timer = run.state["timers"].pop(body.timer_id)
    purpose = timer["purpose"]
    if purpose == "execution":
        limit = run.compiled.spec.timeout.execution if run.compiled.spec.timeout else "?"
        fail_workflow(run, "WorkflowTimeout", f"the workflow did not finish within {activity.duration_text(limit)}")
        return
    if purpose == "retry":
        activity.on_retry_timer(run, timer["activity"])
        return
    if purpose == incidents.TIMER_PURPOSE:
        _incident_timed_out(run, timer)
        return
    if purpose == "activity_timeout":
        aid = timer["activity"]
        retrying, message = activity.on_timeout(run, aid, timer["kind"])
        if not retrying:
            _activity_error(run, aid, "ActivityTimeout", message)
        return
    tid = timer["thread"]
    th = run.state["threads"][tid]
    if purpose == "sleep":
        _advance(run, tid, th, None)
    else:
        step = step_of(run.compiled, th)
        th["wait"]["timer"] = None
        what = "update" if th["wait"]["k"] == "update" else "signal"
        raise_error(run, tid, "Timeout", f"step '{step.id}': no {what} '{th['wait']['name']}' arrived within {activity.duration_text(step.wait.timeout)}")  # type: ignore[union-attr]


def on_signal(run: Run, ev: Event, body: SignalReceived) -> None:
    name = body.name
    threads = run.state["threads"]
    for tid in sorted(threads, key=int):
        w = threads[tid]["wait"]
        if w is not None and w["k"] == "signal" and w["name"] == name:
            if w["timer"]:
                run.state["timers"].pop(w["timer"], None)
            _advance(run, tid, threads[tid], body.data)
            return
    run.state["signals"].setdefault(name, []).append(body.data)


def _update_waiter(state: JSONDict, name: str) -> Optional[str]:
    """The first thread (in thread order) waiting for update ``name``, or None."""
    threads: dict[str, Any] = state["threads"]
    for tid in sorted(threads, key=int):
        w = threads[tid]["wait"]
        if w is not None and w["k"] == "update" and w["name"] == name:
            return tid
    return None


def validate_update(c: CompiledSpec, state: JSONDict, name: str, data: Any) -> None:
    """Check update ``name`` before it is accepted: a thread waits for it and its ``validate`` holds.

    Raises:
        WorkflowError: ``type`` ``"UpdateRejected"``, saying why.
        ExpressionError: the step's ``validate`` expression failed to evaluate.
    """
    tid = _update_waiter(state, name)
    if tid is None:
        waiting = sorted({th["wait"]["name"] for th in state["threads"].values()
                          if th["wait"] is not None and th["wait"]["k"] == "update"})
        raise WorkflowError(f"expected a step of '{state['workflow']}' waiting for update '{name}', but "
                            + (f"it waits for {', '.join(repr(w) for w in waiting)}" if waiting else "none waits for an update now"),
                            type="UpdateRejected")
    th = state["threads"][tid]
    step = step_of(c, th)
    rule = step.wait.validate_ if step.wait is not None else None
    if rule:
        verdict = evaluate(rule, {**scope_in(state, th), "update": data})
        if verdict is not True:
            raise WorkflowError(f"step '{step.id}': validate {rule!r} is {verdict!r} for this update", type="UpdateRejected")


def on_update(run: Run, ev: Event, body: UpdateAccepted) -> None:
    """An accepted update: its waiting step completes with the data, and ``reply`` answers it."""
    tid = _update_waiter(run.state, body.name)
    if tid is None:  # validated against this very state, so only a changed definition gets here
        run.answer_update(body.update_id, {"error": {"type": "UpdateRejected",
                                                     "message": f"no step waits for update '{body.name}'"}})
        return
    th = run.state["threads"][tid]
    step = step_of(run.compiled, th)
    if th["wait"]["timer"]:
        run.state["timers"].pop(th["wait"]["timer"], None)
    _advance(run, tid, th, body.data)
    rule = step.wait.reply if step.wait is not None else None
    try:
        value = evaluate(rule, {**scope(run, th), "update": body.data}) if rule else None
    except ExpressionError as e:
        run.answer_update(body.update_id, {"error": {"type": "ExpressionError", "message": str(e)}})
        fail_workflow(run, "ExpressionError", f"step '{step.id}' (update reply): {e}")
        return
    run.answer_update(body.update_id, {"result": value})


def on_child_completed(run: Run, ev: Event, body: ChildCompleted) -> None:
    child = run.state["children"].pop(body.child_id)
    _advance(run, child["thread"], run.state["threads"][child["thread"]], body.result)


def on_child_failed(run: Run, ev: Event, body: ChildFailed) -> None:
    child = run.state["children"].pop(body.child_id)
    th = run.state["threads"][child["thread"]]
    th["wait"] = None
    raise_error(run, child["thread"], body.error_type,
                f"child workflow {body.child_id} (step '{child['step']}') failed: {body.message}")


def on_retried(run: Run, ev: Event, body: WorkflowRetried) -> None:
    """Re-open a closed instance at the top-level step ``from_step``, its variables as they were.

    ``input_patch`` (a JSON object, or null) is merged into the variables; its key ``input``, if
    any, replaces the workflow input the steps see. The steps before ``from_step`` do not run
    again; the execution timeout, if the workflow has one, counts afresh from now.
    """
    st = run.state
    st["status"] = Status.RUNNING
    st["closed_ms"], st["error"], st["result"] = None, None, None
    st["retries"] = body.attempt
    st.pop("stopped_at", None)
    st.pop("ended", None)
    patch = dict(cast(Optional[JSONDict], body.input_patch) or {})  # an object or null: decide checked it
    if "input" in patch:
        st["input"] = patch.pop("input")
    st["vars"].update(patch)
    tid = new_thread(run, "", None, 0, {})
    _goto(run, st["threads"][tid], body.from_step)
    timeouts = run.compiled.spec.timeout
    if timeouts is not None and timeouts.execution is not None:
        activity.start_timer(run, None, run.now + parse_duration_ms(timeouts.execution), "execution")
    run_until_blocked(run)


#: The spec interpreter's appliers of input events: ``(run, event, its model)``, as ``core.Applier``.
INPUT_APPLIERS: dict[str, Callable[[Run, Event, Any], None]] = {
    "WorkflowStarted": on_started,
    "ActivityCompleted": on_activity_completed,
    "ActivityFailed": on_activity_failed,
    "TimerFired": on_timer_fired,
    "SignalReceived": on_signal,
    "ChildCompleted": on_child_completed,
    "ChildFailed": on_child_failed,
    "ActivityStarted": on_activity_started,
    "HeartbeatRecorded": on_heartbeat,
    "CancelRequested": on_cancel_requested,
    "IncidentResolved": on_incident_resolved,
    "UpdateAccepted": on_update,
}


def apply_input(run: Run, ev: Event, body: AnyEvent) -> None:
    """Deliver one input event (``body`` its model) to the spec workflow and run it to quiescence."""
    try:
        INPUT_APPLIERS[ev.type](run, ev, body)
    except LimitExceeded as e:
        fail_workflow(run, "LimitExceeded", e.message)
    if PENDING_MIGRATION in run.state:  # the input's effect is recorded; migrate before anything runs on
        for hook in AT_SAFE_POINT:
            hook(run)
    run_until_blocked(run)
