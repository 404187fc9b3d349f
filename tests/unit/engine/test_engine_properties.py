"""Hypothesis properties of the pure engine: replay reproduces state, and garbage never crashes it.

(a) Random small spec workflows driven by random interleavings of activity results, signals and
clock advances: folding the recorded events rebuilds the live states, seqs are gap-free, an
instance closes at most once and records nothing but rejections afterwards, and once every signal
is sent, every task completed and every timer due, every instance closes.
(b) Random command sequences, including duplicates, stale attempts, unknown ids and commands for
closed or missing instances: ``decide`` never raises; each command yields events, one
``CommandRejected``, a DLQ verdict, or (for timers, heartbeats, ``return_existing``) nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from itertools import count
from typing import Any, Optional

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kflow.engine import INPUT_EVENTS, decide
from kflow.model.messages import Command, Event
from kflow.testing.harness import EngineHarness

TERMINAL_EVENTS = {"WorkflowCompleted", "WorkflowFailed", "WorkflowCancelled"}
SIGNALS = ("s1", "s2")
LEAF = {"name": "leaf", "version": 1, "steps": [
    {"id": "leaf_work", "task": "b", "queue": "leafq", "input": "input", "output": "r"},
    {"id": "leaf_done", "succeed": "r"},
]}

PROPERTY_SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                             database=None)


# -- random spec workflows -----------------------------------------------------------------------
Draw = Callable[[st.SearchStrategy[Any]], Any]


def _simple_step(draw: Draw, sid: str) -> dict[str, Any]:
    kinds = ["set", "task", "task", "task", "sleep", "wait", "wait", "child"]
    kind = draw(st.sampled_from(kinds))
    if kind == "set":
        k = draw(st.integers(0, 5))
        return {"id": sid, "set": {f"v_{sid}": f"input.n + {k}"}}
    if kind == "task":
        step: dict[str, Any] = {"id": sid, "task": draw(st.sampled_from(["a", "b"])),
                                "queue": draw(st.sampled_from(["default", "q2"]))}
        if draw(st.booleans()):
            step["input"] = "{'n': input.n}"
        if draw(st.booleans()):
            step["output"] = f"o_{sid}"
        return step
    if kind == "sleep":
        return {"id": sid, "sleep": f"{draw(st.integers(1, 10))}s"}
    if kind == "wait":
        wait: dict[str, Any] = {"signal": draw(st.sampled_from(SIGNALS))}
        if draw(st.booleans()):
            wait["timeout"] = f"{draw(st.integers(1, 20))}s"
        return {"id": sid, "wait": wait, "output": f"w_{sid}"}
    return {"id": sid, "child": {"workflow": "leaf", "input": "input.n"}, "output": f"c_{sid}"}


@st.composite
def step_lists(draw: Draw, ids: Any, depth: int = 0, max_len: int = 4) -> list[dict[str, Any]]:
    n = draw(st.integers(1, max_len))
    sids = [f"s{next(ids)}" for _ in range(n)]
    steps: list[dict[str, Any]] = []
    for i, sid in enumerate(sids):
        later = sids[i + 1:]
        kinds = ["simple", "simple", "simple"]
        if later:
            kinds.append("choice")
        if depth < 2:
            kinds += ["parallel", "foreach"]
        kind = draw(st.sampled_from(kinds))
        if kind == "simple":
            steps.append(_simple_step(draw, sid))
        elif kind == "choice":
            # forward jumps only, so a generated workflow always terminates
            rules = [{"when": f"input.n > {draw(st.integers(0, 4))}", "goto": draw(st.sampled_from(later))}
                     for _ in range(draw(st.integers(1, 2)))]
            step: dict[str, Any] = {"id": sid, "choice": rules}
            if draw(st.booleans()):
                step["otherwise"] = draw(st.sampled_from(later))
            steps.append(step)
        elif kind == "parallel":
            branches = [{"steps": draw(step_lists(ids, depth + 1, 2))} for _ in range(draw(st.integers(1, 3)))]
            steps.append({"id": sid, "parallel": branches, "output": f"p_{sid}"})
        else:
            items = draw(st.lists(st.integers(0, 9), max_size=3))
            steps.append({"id": sid, "foreach": str(items), "as": "it", "concurrency": draw(st.integers(0, 2)),
                          "steps": draw(step_lists(ids, depth + 1, 2)), "output": f"f_{sid}"})
    if draw(st.integers(0, 4 + 4 * depth)) == 0:  # an early end, sometimes inside a branch or body
        end = draw(st.sampled_from([{"succeed": "input.n"}, {"succeed": None},
                                    {"fail": {"error": "Nope", "message": "'n=' + string(input.n)"}}]))
        steps.append({"id": f"s{next(ids)}", **end})
    return steps


@st.composite
def workflows(draw: Draw) -> dict[str, Any]:
    return {"name": "rand", "version": 1, "steps": draw(step_lists(count()))}


ACTIONS = st.lists(st.one_of(
    st.tuples(st.just("complete"), st.integers(0, 7)),
    st.tuples(st.just("fail"), st.integers(0, 7)),
    st.tuples(st.just("replay_old"), st.integers(0, 20)),
    st.tuples(st.just("signal"), st.sampled_from(SIGNALS), st.integers(0, 1)),
    st.tuples(st.just("advance"), st.integers(1, 15)),
    st.tuples(st.just("cancel"), st.integers(0, 1)),
), min_size=4, max_size=25)


def _check_histories(h: EngineHarness) -> None:
    assert h.reprocess() == h.states
    for iid, events in h.history.items():
        assert [e.seq for e in events] == list(range(1, len(events) + 1)), iid
        assert h.states[iid]["seq"] == len(events)
        # an id reused after close (allow_if_closed) starts a new run in the same history
        starts = [i for i, e in enumerate(events) if e.type == "WorkflowStarted"]
        assert starts and starts[0] == 0, iid
        run = events[starts[-1]:]
        for a, b in zip(starts, starts[1:] + [len(events)], strict=True):
            types = [e.type for e in events[a:b]]
            terminal = [i for i, t in enumerate(types) if t in TERMINAL_EVENTS]
            assert len(terminal) <= 1, (iid, types)
            if terminal:
                assert all(t == "CommandRejected" for t in types[terminal[0] + 1:]), types
            if b < len(events):
                assert terminal, ("restarted before closing", iid, types)
        terminal = [e for e in run if e.type in TERMINAL_EVENTS]
        if terminal:
            assert h.states[iid]["status"] in ("COMPLETED", "FAILED", "CANCELLED")
            assert h.states[iid]["timers"] == {} and h.states[iid]["activities"] == {}
        else:
            assert h.states[iid]["status"] == "RUNNING"


@PROPERTY_SETTINGS
@given(doc=workflows(), inputs=st.lists(st.integers(0, 5), min_size=1, max_size=2), actions=ACTIONS)
def test_random_workflows_replay_to_the_same_state(doc: dict[str, Any], inputs: list[int],
                                                   actions: list[tuple[Any, ...]]) -> None:
    h = EngineHarness()
    h.deploy(LEAF)
    h.deploy(doc)
    h.auto_run_tasks = False
    roots = [f"r{i}" for i in range(len(inputs))]
    for iid, n in zip(roots, inputs, strict=True):
        h.start("rand", iid, {"n": n})
    done: list[Any] = []
    for action in actions:
        kind = action[0]
        if kind in ("complete", "fail") and h.pending_tasks:
            task = h.pending_tasks[action[1] % len(h.pending_tasks)]
            h.pending_tasks.remove(task)
            done.append(task)
            if kind == "complete":
                h.send("CompleteActivity", task.instance_id, activity_id=task.activity_id, attempt=task.attempt,
                       result={"from": task.activity_id})
            else:
                h.send("FailActivity", task.instance_id, activity_id=task.activity_id, attempt=task.attempt,
                       error_type="Boom", message="x", retryable=True)
        elif kind == "replay_old" and done:
            task = done[action[1] % len(done)]
            h.send("CompleteActivity", task.instance_id, activity_id=task.activity_id, attempt=task.attempt,
                   result="dup")
        elif kind == "signal":
            h.signal(roots[action[2] % len(roots)], action[1], {"sig": action[1]})
        elif kind == "advance":
            h.advance(action[1])
        elif kind == "cancel" and action[1] == 0:
            h.send("CancelWorkflow", roots[0], reason="random")
    assert h.dlq == []
    _check_histories(h)

    # liveness: deliver everything a workflow can wait for, and every instance closes
    for _ in range(30):
        running = [iid for iid, s in h.states.items() if s["status"] == "RUNNING"]
        if not running and not h.pending_tasks:
            break
        while h.pending_tasks:
            task = h.pending_tasks.popleft()
            h.send("CompleteActivity", task.instance_id, activity_id=task.activity_id, attempt=task.attempt,
                   result=1)
        for iid in running:
            for name in SIGNALS:
                h.signal(iid, name, None)
        h.advance(30)
    assert all(s["status"] != "RUNNING" for s in h.states.values()), \
        {iid: (s["status"], s["threads"]) for iid, s in h.states.items()}
    _check_histories(h)


# -- random (and garbage) command sequences -------------------------------------------------------
ORDERS = {"name": "orders", "version": 1, "steps": [
    {"id": "charge", "task": "a", "output": "r"},
    {"id": "approve", "wait": {"signal": "go", "timeout": "10s"}},
    {"id": "kid", "child": {"workflow": "leaf", "input": "1"}},
    {"id": "nap", "sleep": "5s"},
]}
INSTANCES = ("i1", "i2", "i3")


def _known(h: EngineHarness, key: str) -> list[str]:
    ids = {e.data[key] for events in h.history.values() for e in events if key in e.data}
    return sorted(ids) + [f"bogus-{key}"]


def _random_command(data: st.DataObject, h: EngineHarness) -> Command:
    iid = data.draw(st.sampled_from(INSTANCES + tuple(_known(h, "child_id")[:3])))
    kind = data.draw(st.sampled_from(["StartWorkflow", "SignalWorkflow", "CancelWorkflow", "CompleteActivity",
                                      "FailActivity", "HeartbeatActivity", "FireTimer", "CompleteChild",
                                      "FailChild", "Explode"]))
    attempt = data.draw(st.sampled_from([1, 1, 1, 2]))
    payload = data.draw(st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=3),
                                  st.dictionaries(st.text(max_size=2), st.integers(0, 3), max_size=2)))
    if kind == "StartWorkflow":
        d: dict[str, Any] = {"workflow": data.draw(st.sampled_from(["orders", "leaf", "ghost"])),
                             "version": data.draw(st.sampled_from([None, None, 1, 4])), "input": payload,
                             "parent_id": None, "parent_ref": None,
                             "id_reuse": data.draw(st.sampled_from([None, "reject_duplicate", "return_existing",
                                                                    "allow_if_closed"]))}
    elif kind == "SignalWorkflow":
        d = {"name": data.draw(st.sampled_from(["go", "other"])), "data": payload}
    elif kind == "CancelWorkflow":
        d = {"reason": "r"}
    elif kind in ("CompleteActivity", "FailActivity", "HeartbeatActivity"):
        d = {"activity_id": data.draw(st.sampled_from(_known(h, "activity_id"))), "attempt": attempt}
        if kind == "CompleteActivity":
            d["result"] = payload
        elif kind == "FailActivity":
            d.update(error_type="E", message="m", retryable=data.draw(st.booleans()))
        else:
            d["details"] = payload
    elif kind == "FireTimer":
        d = {"timer_id": data.draw(st.sampled_from(_known(h, "timer_id")))}
    elif kind in ("CompleteChild", "FailChild"):
        d = {"child_id": data.draw(st.sampled_from(_known(h, "child_id")))}
        d.update({"result": payload} if kind == "CompleteChild" else {"error_type": "E", "message": "m"})
    else:
        d = {}
    return Command(kind, iid, d)


def _classify(c: Command, state: Optional[dict[str, Any]], events: list[Event], dlq: Optional[str]) -> None:
    if dlq is not None:
        assert events == []
        return
    if not events:
        assert c.type in ("FireTimer", "HeartbeatActivity") or \
            (c.type == "StartWorkflow" and c.data.get("id_reuse") == "return_existing" and state is not None), c
        return
    first = events[0]
    assert first.instance_id == c.instance_id
    assert first.seq == (state["seq"] if state else 0) + 1
    if first.type == "CommandRejected":
        assert len(events) == 1
        assert first.data["command_type"] == c.type
    else:
        assert first.type in INPUT_EVENTS
        assert all(e.type not in INPUT_EVENTS for e in events[1:])


@PROPERTY_SETTINGS
@given(data=st.data(), n=st.integers(1, 30))
def test_random_command_sequences_never_raise(data: st.DataObject, n: int) -> None:
    h = EngineHarness()
    h.deploy(LEAF)
    h.deploy(ORDERS)
    h.activity("a", lambda x: {"a": x})
    h.auto_run_tasks = False
    for _ in range(n):
        if data.draw(st.integers(0, 5)) == 0:
            h.clock.advance(data.draw(st.integers(1, 12)))
        c = _random_command(data, h)
        state = h.states.get(c.instance_id)
        before = copy.deepcopy(state)
        dec = decide(state, c, h.clock.ms, h.defs)
        assert state == before
        _classify(c, state, dec.events, dec.dlq_reason)
        h.send(c.type, c.instance_id, **c.data)
        if data.draw(st.booleans()) and h.pending_tasks:
            # a worker answers some task, possibly long after its instance closed
            h.run_task(h.pending_tasks.popleft())
            h.drain()
    _check_histories(h)
