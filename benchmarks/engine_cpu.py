#!/usr/bin/env python3
"""Engine CPU per command, no broker: decode + decide + encode of the outputs + the changelog records.

Drives chain3 (StartWorkflow, then three CompleteActivity commands per instance) through exactly
the work the engine processor does per command between ``poll`` and ``produce``: decode the
command from its Avro bytes, look up the state, ``decide``, encode every event and task, and
encode the ``state`` changelog record and the ``journal`` changelog records (a code workflow's
history entries). Also times one step of a code workflow after it has already completed 10,
1,000 and 10,000 activities, with the changelog bytes it writes (state record + journal records)
and the time to rebuild it by replay after a restart (the cache of live workflows cleared), which
is how "cost flat in history length, rebuild linear" is checked.

With ``--auth`` the chain3 runs are repeated with the engine's auth work on every command (what
``KFLOW_AUTH=on`` adds): a start's command token verified (signature, claims, digest of the
record, replay check) and the policy asked, the owner stamped, the token id kept in the new
instance's state and the start's audit record encoded; an attempt token made for every task and
checked on every result; the partition's seen-token records (none in chain3: every id goes into
a state) produced every :data:`AUTH_BATCH` commands. Starts are signed before the
clock runs (that is the client's cost), and the table gains the µs/command with auth on.

    python benchmarks/engine_cpu.py [-n 5000] [--profile] [--auth]

Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from pathlib import Path
from typing import Any

import yaml

from kflow.engine import InMemoryDefinitions, compile_spec, decide
from kflow.engine.journal import InMemoryJournal
from kflow.model.messages import Command, JSONDict
from kflow.schemas.codec import decode_command, encode_command, encode_event, encode_state, encode_task
from kflow.security import CommandGuard, CommandSigner, Keys, SeenTokens, issue, parse_policy
from kflow.security.guard import MUTATING
from kflow.streams.processor import state_record
from kflow.streams.store import journal_records

NOW = 1_700_000_000_000
CHAIN3 = Path(__file__).resolve().parents[1] / "kflow" / "dev" / "chain3.yaml"
#: Commands per simulated batch with ``--auth``: the seen token ids are written once per batch.
AUTH_BATCH = 100


class AuthWork:
    """The engine's auth work per command, as the processor's lane does it (``kflow.streams.lane``).

    The bench principal holds a role granting ``definition:Execute`` (not ``system_admin``, which
    would skip the policy's grants), as ``kflow bench --auth`` does.
    """

    def __init__(self) -> None:
        keys = Keys(secret=b"engine-cpu-benchmark-secret-32-bytes!")
        policy = parse_policy({"roles": {"bench": ["definition:Create", "definition:Execute", "instance:View"]},
                               "bindings": {"default": {"bench": ["bench"]}}})
        self.guard = CommandGuard(keys, lambda: policy, 7 * 24 * 3600)
        self.signer = CommandSigner(issue("bench", "default", ["bench"], 3600, keys, now=NOW / 1000), keys, 600)
        self.seen = SeenTokens(100_000)
        self.attempts: dict[tuple[str, str, int], bytes] = {}  # what the engine put on each task
        self.commands = 0

    def sign(self, raw: bytes, iid: str) -> bytes:
        """The client's command token of a start (not timed)."""
        return self.signer.header(iid.encode(), raw, now=NOW / 1000)[1]

    def check(self, cmd: Command, state: JSONDict | None, raw: bytes, token: bytes | None) -> Any:
        attempt = None
        if cmd.type != "StartWorkflow":  # what the worker sent back with the result
            attempt = self.attempts.pop((cmd.instance_id, cmd.data["activity_id"], cmd.data["attempt"]))
        check = self.guard.check(cmd, state, token, attempt, cmd.instance_id.encode(), raw, NOW / 1000,
                                 self.seen.cache, defer=True)
        assert check.allowed, check.reason
        return check

    def granted(self, cmd: Command, check: Any, state: JSONDict | None) -> None:
        if cmd.type == "StartWorkflow" and state is not None:
            state["owner"], state["tenant"] = self.guard.starter(check.principal)
        self.guard.remember(check, state, self.seen.cache, NOW / 1000)  # the start's id goes into its state
        if cmd.type in MUTATING:
            self.guard.audit_value(check, cmd, "success", NOW, "commands[0]@0")
        self.commands += 1
        if self.commands % AUTH_BATCH == 0:
            self.seen.changelog(self.commands, NOW / 1000)
            self.seen.committed()

    def task(self, t: Any) -> None:
        t.attempt_token = self.guard.attempt_token(t.instance_id, t.activity_id, t.attempt)
        self.attempts[(t.instance_id, t.activity_id, t.attempt)] = t.attempt_token.encode()


def _engine_step(defs: Any, states: dict[str, JSONDict], raw: bytes, journal: InMemoryJournal,
                 auth: AuthWork | None = None, token: bytes | None = None) -> tuple[list[Command], int]:
    """What the processor does for one command; returns the follow-up commands and the changelog
    bytes (state record + journal records) it writes. ``journal`` stands in for the journal store;
    with ``auth``, the guard's work is done too (``token``: a start's command token)."""
    cmd = decode_command(raw, None)
    check = auth.check(cmd, states.get(cmd.instance_id), raw, token) if auth is not None else None
    d = decide(states.get(cmd.instance_id), cmd, NOW, defs, journal)
    if auth is not None:
        auth.granted(cmd, check, d.state)
    follow: list[Command] = []
    size = 0
    for key, value in journal_records(d.journal):
        size += len(key) + len(value or b"")
    journal.apply(d.journal)
    for ev in d.events:
        encode_event(ev)
    for t in d.tasks:
        if auth is not None and t.kind != "cancel":
            auth.task(t)
        encode_task(t)
        if t.kind != "cancel":
            follow.append(Command("CompleteActivity", cmd.instance_id,
                                  {"activity_id": t.activity_id, "attempt": t.attempt, "result": t.input + 1}))
    if d.events and d.state is not None:
        states[cmd.instance_id] = d.state
        size += len(encode_state(state_record(d.state)))
    return follow, size


def chain3(defs: Any, n: int, workflow: str, auth: AuthWork | None = None) -> dict[str, Any]:
    states: dict[str, JSONDict] = {}
    journal = InMemoryJournal()
    # Pre-encode (and with auth, sign) the starts so that is the client's cost, not the engine's.
    starts = [encode_command(Command("StartWorkflow", f"wf-{i}", {"workflow": workflow, "version": None, "input": i}))
              for i in range(n)]
    queue: list[tuple[bytes, bytes | None]] = [
        (raw, auth.sign(raw, f"wf-{i}") if auth is not None else None) for i, raw in enumerate(starts)]
    commands = 0
    t0 = time.perf_counter()
    while queue:
        nxt: list[tuple[bytes, bytes | None]] = []
        for raw, token in queue:
            follow, _ = _engine_step(defs, states, raw, journal, auth, token)
            commands += 1
            nxt.extend((encode_command(c), None) for c in follow)  # the worker's cost, excluded below
        queue = nxt
    total = time.perf_counter() - t0
    done = sum(1 for s in states.values() if s["status"] == "COMPLETED")
    assert done == n, f"only {done}/{n} chain3 instances completed"
    return {"commands": commands, "seconds": total}


def _encode_cost(n: int) -> float:
    """Time of encoding the CompleteActivity commands (done by workers), subtracted from the total."""
    cmds = [Command("CompleteActivity", f"wf-{i}", {"activity_id": "a", "attempt": 1, "result": i}) for i in range(n)]
    t0 = time.perf_counter()
    for c in cmds:
        encode_command(c)
    return time.perf_counter() - t0


def code_defs() -> Any:
    import kflow
    from kflow.authoring import definition_of

    @kflow.workflow(name="cpu.loop", version=1)
    async def loop(ctx: Any, steps: int) -> int:
        x = 0
        for _ in range(steps):
            x = await ctx.activity("bench.inc", x, queue="bench")
        return x

    defs = InMemoryDefinitions()
    defs.add(definition_of(loop))
    return defs


def history_cost(defs: Any, marks: list[int], reps: int = 50) -> list[dict[str, Any]]:
    """Per-step CPU and changelog bytes of a code workflow after k completed activities, and the
    time of one step that must first rebuild it from its journal (as after a restart)."""
    states: dict[str, JSONDict] = {}
    journal = InMemoryJournal()
    iid = "long-1"
    raw = encode_command(Command("StartWorkflow", iid, {"workflow": "cpu.loop", "version": None, "input": 10**9}))
    follow, _ = _engine_step(defs, states, raw, journal)
    out = []
    done = 0
    for mark in marks:
        while done < mark:
            follow, _ = _engine_step(defs, states, encode_command(follow[0]), journal)
            done += 1
        # time `reps` further steps from here (they advance the history by `reps`, small next to the
        # next mark; the time includes encoding the result commands, a few µs each)
        t0 = time.perf_counter()
        size = 0
        for rep in range(reps):
            follow, step_size = _engine_step(defs, states, encode_command(follow[0]), journal)
            if rep == 0:
                size = step_size  # the changelog bytes written by the step right after `mark` activities
        dt = time.perf_counter() - t0
        record = len(encode_state(state_record(states[iid])))
        defs.replay_cache.clear()  # a restart: the next step replays the whole run from the journal
        t1 = time.perf_counter()
        follow, _ = _engine_step(defs, states, encode_command(follow[0]), journal)
        rebuild = time.perf_counter() - t1
        done += reps + 1
        out.append({"completed_activities": mark, "us_per_step": round(dt / reps * 1e6, 1),
                    "changelog_bytes_per_step": size, "state_record_bytes": record,
                    "rebuild_ms": round(rebuild * 1e3, 2)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=5000, help="chain3 instances (4 commands each)")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the spec chain3 run")
    ap.add_argument("--marks", default="10,1000,10000", help="history lengths for the code-workflow step cost")
    ap.add_argument("--auth", action="store_true",
                    help="also run chain3 with the engine's auth work (what KFLOW_AUTH=on adds per command); "
                         "with --profile, profile that run")
    a = ap.parse_args()

    spec_defs = InMemoryDefinitions()
    spec_defs.add(compile_spec(yaml.safe_load(CHAIN3.read_text())))
    cdefs = code_defs()
    chain3(spec_defs, 200, "bench.chain3")  # warm-up
    if a.auth:
        chain3(spec_defs, 200, "bench.chain3", AuthWork())
    if a.profile:
        prof = cProfile.Profile()
        prof.enable()
        chain3(spec_defs, a.n, "bench.chain3", AuthWork() if a.auth else None)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    worker_share = _encode_cost(3 * a.n)
    spec = chain3(spec_defs, a.n, "bench.chain3")
    code = chain3(cdefs_chain3(cdefs), a.n, "bench.chain3code")
    runs = [("spec chain3", spec), ("code chain3", code)]
    if a.auth:  # right after the runs without, so both see the same machine
        runs += [("spec chain3 auth on", chain3(spec_defs, a.n, "bench.chain3", AuthWork())),
                 ("code chain3 auth on", chain3(cdefs, a.n, "bench.chain3code", AuthWork()))]
    rows = {}
    for label, r in runs:
        rows[label] = round((r["seconds"] - worker_share) / r["commands"] * 1e6, 1)
    if a.auth:
        for kind in ("spec", "code"):
            rows[f"{kind} chain3 auth cost"] = round(rows[f"{kind} chain3 auth on"] - rows[f"{kind} chain3"], 1)
    marks = [int(x) for x in a.marks.split(",")]
    hist = history_cost(cdefs, marks)
    for label, us in rows.items():
        print(f"{label:<24} {us:>8.1f} µs/command")
    for h in hist:
        print(f"code step after {h['completed_activities']:>6} activities: {h['us_per_step']:>8.1f} µs, "
              f"changelog {h['changelog_bytes_per_step']:>6} bytes (state record {h['state_record_bytes']} "
              f"+ journal), rebuild after a restart {h['rebuild_ms']:>8.2f} ms")
    print(json.dumps({"engine_cpu_us_per_command": rows, "code_history_cost": hist, "n": a.n}))


def cdefs_chain3(defs: Any) -> Any:
    """Add ``kflow bench --style code``'s own chain3 workflow to ``defs``."""
    from kflow.authoring import definition_of
    from kflow.dev.bench_workflows import chain3 as bench_chain3

    defs.add(definition_of(bench_chain3))
    return defs


if __name__ == "__main__":
    main()
