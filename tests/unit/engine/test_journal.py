"""The journal of code workflows: history outside the state, so a step costs the same at any length.

Drives code workflows through ``decide`` with an explicit journal (as the engine's lanes do),
applies each decision's journal ops, and checks the state record stays small, each step journals
one or two small entries, a rebuild reads the journal once and replays to the same decision,
runs that close or continue as new delete their entries, and a state written before the journal
(its history inside) still resumes. The RocksDB side (keys, tombstones, the batch overlay) is
checked on a real store.
"""

from __future__ import annotations

from typing import Any, Optional

import kflow
from kflow.engine import InMemoryDefinitions, decide, fold
from kflow.engine.code_journal import history_of
from kflow.engine.core import Decision
from kflow.engine.journal import COMMAND, INPUT, Append, Entries, InMemoryJournal, Reset
from kflow.model.messages import Command, Event, JSONDict
from kflow.schemas.codec import encode_engine_state
from kflow.streams.lane import BatchJournal
from kflow.streams.store import JOURNAL_PREFIX, StorePartition, journal_key, journal_records

NOW = 1_700_000_000_000
#: The bound on a code workflow's state record, whatever its history length.
STATE_RECORD_LIMIT = 4096


@kflow.workflow(name="j.loop", version=1)
async def loop(ctx, steps):
    x = 0
    for _ in range(steps):
        x = await ctx.activity("inc", x)
    return x


@kflow.workflow(name="j.chain", version=1)
async def chain(ctx, input):
    n = input["n"]
    for _ in range(2):
        n = await ctx.activity("inc", n)
    if n < input["until"]:
        ctx.continue_as_new({"n": n, "until": input["until"]})
    return n


def _legacy_effect() -> int:
    return 1000  # the state below recorded 7: a replay must return the recorded value, not run this


@kflow.workflow(name="j.legacy", version=1)
async def legacy(ctx, steps):
    x = await ctx.side_effect(_legacy_effect)
    for _ in range(steps):
        x = await ctx.activity("inc", x)
    return x


#: A state exactly as the engine wrote it before the journal existed: ``j.legacy`` with input 4,
#: two activities completed, the third scheduled; its history is inside (``inputs``, ``commands``).
LEGACY_STATE: JSONDict = {
    "id": "old-1", "workflow": "j.legacy", "version": 1, "kind": "code", "status": "RUNNING", "seq": 6,
    "started_ms": NOW, "updated_ms": NOW, "closed_ms": None, "input": 4, "vars": {}, "result": None, "error": None,
    "parent_id": None, "parent_ref": None, "threads": {}, "next_tid": 0,
    "activities": {"inc-6": {"name": "inc", "queue": "default", "attempt": 1, "thread": "code", "step": "inc",
                             "input": 9, "phase": "scheduled", "timers": {}}},
    "timers": {}, "children": {}, "signals": {},
    "inputs": [["WorkflowStarted", {"workflow": "j.legacy", "version": 1, "input": 4, "parent_id": None,
                                    "parent_ref": None}, NOW, 1],
               ["ActivityCompleted", {"activity_id": "inc-2", "attempt": 1, "result": 8}, NOW, 3],
               ["ActivityCompleted", {"activity_id": "inc-4", "attempt": 1, "result": 9}, NOW, 5]],
    "commands": [["side_effect", "", 7], ["activity", "inc", "inc-2"], ["activity", "inc", "inc-4"],
                 ["activity", "inc", "inc-6"]],
    "delivered": 3,
}


class CountingJournal(InMemoryJournal):
    """An in-memory journal that counts reads: the live path must not read at all."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def read(self, instance_id: str, run: int) -> tuple[Entries, Entries]:
        self.reads += 1
        return super().read(instance_id, run)


def defs() -> InMemoryDefinitions:
    d = InMemoryDefinitions()
    for fn in (loop, chain, legacy):
        d.add(kflow.authoring.definition_of(fn))
    return d


def start(iid: str, workflow: str, input_: Any) -> Command:
    return Command("StartWorkflow", iid, {"workflow": workflow, "version": None, "input": input_})


def complete(d: Decision, result: Any) -> Command:
    """The result of the one activity ``d`` scheduled."""
    (task,) = [t for t in d.tasks if t.kind == "run"]
    return Command("CompleteActivity", task.instance_id,
                   {"activity_id": task.activity_id, "attempt": task.attempt, "result": result})


class Driver:
    """Decides commands as a lane does: state in a dict, the decision's journal ops applied after it."""

    def __init__(self, journal: Optional[InMemoryJournal] = None) -> None:
        self.defs = defs()
        self.journal = journal if journal is not None else CountingJournal()
        self.states: dict[str, JSONDict] = {}
        self.history: dict[str, list[Event]] = {}

    def step(self, cmd: Command) -> Decision:
        d = decide(self.states.get(cmd.instance_id), cmd, NOW, self.defs, self.journal)
        assert d.dlq_reason is None and d.events, d
        self.states[cmd.instance_id] = d.state  # type: ignore[assignment]
        self.history.setdefault(cmd.instance_id, []).extend(d.events)
        self.journal.apply(d.journal)
        return d


def record_bytes(st: JSONDict) -> int:
    """Size of the instance's ``engine-state`` changelog record (the whole state)."""
    return len(encode_engine_state(st["id"], st))


# -- bounded state ------------------------------------------------------------------------------
def test_a_10000_step_workflow_keeps_a_small_state_record_and_rebuilds_from_its_journal() -> None:
    run = Driver()
    d = run.step(start("long", "j.loop", 10_002))
    sizes: dict[int, int] = {}
    for step in range(1, 10_001):
        d = run.step(complete(d, step))
        # each step journals its input and the command it led to: two small entries, not the history
        assert [(op.kind, op.index) for op in d.journal] == [(INPUT, step), (COMMAND, step)]  # type: ignore[union-attr]
        assert all(len(k) + len(v or b"") < 200 for k, v in journal_records(d.journal))
        if step in (10, 10_000):
            sizes[step] = record_bytes(run.states["long"])
    assert sizes[10] < STATE_RECORD_LIMIT and sizes[10_000] < STATE_RECORD_LIMIT, sizes
    assert sizes[10_000] - sizes[10] < 64  # a few digits more in the counters and seq
    assert run.journal.reads == 0  # the live path never reads the journal

    st, nxt = run.states["long"], complete(d, 10_001)
    live = decide(st, nxt, NOW, run.defs, run.journal)  # the cached coroutine, not applied
    assert run.journal.reads == 0
    run.defs.replay_cache.clear()  # a restart: the coroutine is rebuilt from the journal
    misses = run.defs.replay_cache.misses
    rebuilt = decide(st, nxt, NOW, run.defs, run.journal)
    assert run.journal.reads == 1 and run.defs.replay_cache.misses == misses + 1  # read once, in one piece
    assert (rebuilt.state, rebuilt.events, rebuilt.tasks, rebuilt.journal) == (
        live.state, live.events, live.tasks, live.journal)
    assert [(t.name, t.input) for t in rebuilt.tasks] == [("inc", 10_001)]  # the same next command
    run.states["long"] = rebuilt.state  # type: ignore[assignment]
    run.journal.apply(rebuilt.journal)
    done = run.step(complete(rebuilt, 10_002))  # the rebuilt coroutine went back to the cache
    assert run.journal.reads == 1
    assert done.state is not None and done.state["status"] == "COMPLETED" and done.state["result"] == 10_002
    # closing deletes the run's journal: every entry it wrote, counted by the state
    assert done.journal[-1] == Reset("long", 1, 10_003, 10_002)
    assert run.journal.runs("long") == []
    assert "input_count" not in done.state and "delivered" not in done.state


def test_a_rebuilt_coroutine_continues_like_the_cached_one() -> None:
    cached, replayed = Driver(), Driver()
    outcomes = []
    for run, cache in ((cached, 10_000), (replayed, 0)):
        run.defs.replay_cache.max_size = cache
        d = run.step(start("l", "j.loop", 5))
        for step in range(1, 6):
            d = run.step(complete(d, step * 10))
        outcomes.append(([(e.type, e.seq, e.data) for e in run.history["l"]], run.states["l"]))
    assert outcomes[0] == outcomes[1] and outcomes[0][1]["result"] == 50
    assert cached.journal.reads == 0 and replayed.journal.reads == 5  # one read per rebuild
    assert fold(cached.history["l"], cached.defs) == cached.states["l"]


def test_each_step_journals_one_or_two_entries() -> None:
    run = Driver()
    d = run.step(start("s", "j.loop", 2))
    assert d.journal == [Append("s", 1, INPUT, 0, ["WorkflowStarted", d.events[0].data, NOW, 1]),
                         Append("s", 1, COMMAND, 0, ["activity", "inc", "inc-2"])]
    (task,) = d.tasks
    started = run.step(Command("StartActivity", "s", {"activity_id": task.activity_id, "attempt": 1}))
    assert started.events[0].type == "ActivityStarted" and started.journal == []  # history, not an input
    d = run.step(complete(d, 1))
    assert [type(op).__name__ for op in d.journal] == ["Append", "Append"]
    d = run.step(complete(d, 2))
    assert [type(op).__name__ for op in d.journal] == ["Append", "Reset"]  # the last input, then close
    assert run.states["s"]["result"] == 2 and run.journal.runs("s") == []


def test_continue_as_new_deletes_the_old_run_and_reuse_starts_afresh() -> None:
    run = Driver()
    d = run.step(start("c", "j.chain", {"n": 0, "until": 4}))
    d = run.step(complete(d, 1))
    d = run.step(complete(d, 2))  # continues as new: run 1 is done with
    resets = [op for op in d.journal if isinstance(op, Reset)]
    assert resets == [Reset("c", 1, 3, 2)] and run.journal.runs("c") == [2]
    assert run.states["c"]["run"] == 2 and run.states["c"]["input_count"] == 1
    run.defs.replay_cache.clear()
    d = run.step(complete(d, 3))  # rebuilt from run 2's entries only
    d = run.step(complete(d, 4))
    assert run.states["c"]["result"] == 4 and run.journal.runs("c") == []
    assert fold(run.history["c"], run.defs) == run.states["c"]
    again = run.step(Command("StartWorkflow", "c", {"workflow": "j.loop", "version": None, "input": 1,
                                                    "id_reuse": "allow_if_closed"}))
    assert [op.index for op in again.journal] == [0, 0]  # type: ignore[union-attr]
    assert run.journal.read("c", 1) == ([again.journal[0].entry], [again.journal[1].entry])  # type: ignore[union-attr]


# -- states written before the journal ------------------------------------------------------------
def test_an_old_format_state_resumes_and_moves_its_history_into_the_journal() -> None:
    run = Driver()
    run.states["old-1"] = dict(LEGACY_STATE)
    d = run.step(Command("CompleteActivity", "old-1", {"activity_id": "inc-6", "attempt": 1, "result": 10}))
    st = run.states["old-1"]
    assert "inputs" not in st and "commands" not in st
    assert (st["input_count"], st["command_count"], st["delivered"]) == (4, 5, 4)
    assert run.journal.reads == 0  # nothing there yet: the history came from the state
    inputs, commands = run.journal.read("old-1", 1)
    assert inputs[:3] == LEGACY_STATE["inputs"] and commands[:4] == LEGACY_STATE["commands"]
    assert commands[4] == ["activity", "inc", "inc-8"]
    assert record_bytes(st) < record_bytes(LEGACY_STATE)
    run.defs.replay_cache.clear()  # the next rebuild reads the migrated journal
    reads = run.journal.reads
    d = run.step(complete(d, 11))
    assert run.journal.reads == reads + 1
    assert run.states["old-1"]["result"] == 11  # 7 (the recorded side effect) + 4 increments


def test_an_old_format_state_still_answers_queries_and_closes_cleanly() -> None:
    old = dict(LEGACY_STATE)
    assert history_of(old) == (old["inputs"], old["commands"])
    run = Driver()
    run.states["old-1"] = old
    run.step(Command("TerminateWorkflow", "old-1", {"reason": "ops"}))
    st = run.states["old-1"]
    assert st["status"] == "TERMINATED" and "inputs" not in st and "commands" not in st


# -- the store side ---------------------------------------------------------------------------------
def test_store_keeps_journal_entries_and_drops_a_reset_run(tmp_path: Any) -> None:
    run = Driver(InMemoryJournal())
    ops = []
    d = run.step(start("k", "j.loop", 2))
    ops += d.journal
    d = run.step(complete(d, 1))
    ops += d.journal
    sp = StorePartition(str(tmp_path / "p0"), 0, 0)
    try:
        sp.write({}, {}, None, journal=journal_records(ops), journal_next=7)
        assert sp.read_journal("k", 1) == run.journal.read("k", 1)
        assert sp.journal_offset() == 7
        keys = [k for k in sp.db.keys(from_key=JOURNAL_PREFIX) if k.startswith(JOURNAL_PREFIX)]
        assert keys == sorted(JOURNAL_PREFIX + journal_key("k", 1, kind, i)
                              for kind, n in ((INPUT, 2), (COMMAND, 2)) for i in range(n))
        # the batch overlay: a decision sees the entries of earlier decisions of its batch
        d2 = run.step(complete(d, 2))
        reader = BatchJournal(sp, {"k": list(d2.journal[:1])})
        inputs, commands = reader.read("k", 1)
        assert len(inputs) == 3 and inputs[2] == d2.journal[0].entry and len(commands) == 2  # type: ignore[union-attr]
        assert BatchJournal(sp, {"k": list(d2.journal)}).read("k", 1) == ([], [])  # reset within the batch
        sp.write({}, {}, None, journal=journal_records(d2.journal), journal_next=9)
        assert sp.read_journal("k", 1) == ([], [])
        assert not [k for k in sp.db.keys(from_key=JOURNAL_PREFIX) if k.startswith(JOURNAL_PREFIX)]
    finally:
        sp.close()
