"""Crash matrix: SIGKILL engines and workers at random moments under steady load, then check the
outcome with an oracle that recomputes everything from the input topics.

Assertions (for every instance): exactly one terminal state and it is the expected result; the
events topic holds each sequence number exactly once (every transition recorded once); the last
``state`` record equals the fold of the instance's events; no activity result applied twice.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from kflow.authoring import definition_of
from kflow.client import Client
from kflow.config import KafkaConfig
from kflow.dev.procs import engine_process, worker_process
from kflow.engine import InMemoryDefinitions, compile_spec, fold
from kflow.engine.core import EVENTS_OFFSET, status_record
from kflow.model.messages import Status
from kflow.schemas.codec import decode_engine_state, decode_event, decode_state
from kflow.streams.topics import ensure_topics
from tests.fault.flows import CODE, DEFS, expected

PARTITIONS = 4
WORKFLOWS = ["f.chain", "f.nap", "f.fan", "f.parent", "f.code_chain", "f.code_fan"]


def read_all(bootstrap: str, topic: str) -> list:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex, "isolation.level": "read_committed",
                  "enable.partition.eof": True, "auto.offset.reset": "earliest"})
    try:
        md = c.list_topics(topic, timeout=10)
        tps, ends = [], {}
        for p in md.topics[topic].partitions:
            lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)
            if hi > lo:
                tps.append(TopicPartition(topic, p, lo))
                ends[p] = hi
        c.assign(tps)
        out = []
        deadline = time.monotonic() + 60
        while ends and time.monotonic() < deadline:
            for m in c.consume(1000, 0.2):
                if m.error():
                    if m.error().code() == -191:  # _PARTITION_EOF
                        ends.pop(m.partition(), None)
                    continue
                out.append(m)
        return out
    finally:
        c.close()


def oracle(bootstrap: str, prefix: str, started: dict[str, tuple[str, int]]) -> None:
    defs = InMemoryDefinitions()
    for d in DEFS:
        defs.add(compile_spec(d))
    for fn in CODE:
        defs.add(definition_of(fn))
    events = defaultdict(list)
    for m in read_all(bootstrap, f"{prefix}events"):
        ev = decode_event(m.value())
        events[ev.instance_id].append(ev)
    last_state = {}
    for m in read_all(bootstrap, f"{prefix}engine-state"):  # the engine's whole state, beside the public record
        iid, internal = decode_engine_state(m.value())
        last_state[iid] = status_record(internal)
    public = {}
    for m in read_all(bootstrap, f"{prefix}state"):
        rec = decode_state(m.value())
        public[rec["instance_id"]] = rec
    problems = []
    for iid, (wf, x) in started.items():
        evs = sorted(events.get(iid, []), key=lambda e: e.seq)
        seqs = [e.seq for e in evs]
        if seqs != list(range(1, len(seqs) + 1)):
            dup = [s for s, n in Counter(seqs).items() if n > 1]
            problems.append(f"{iid}: seqs not exactly once 1..n (duplicates {dup[:5]}, n={len(seqs)})")
            continue
        terminal = [e for e in evs if e.type in ("WorkflowCompleted", "WorkflowFailed", "WorkflowCancelled")]
        if len(terminal) != 1:
            problems.append(f"{iid}: {len(terminal)} terminal events")
            continue
        if terminal[0].type != "WorkflowCompleted" or terminal[0].data["result"] != expected(wf, x):
            problems.append(f"{iid}: {terminal[0].type} {terminal[0].data} != {expected(wf, x)}")
        applied = Counter((e.data["activity_id"], e.data["attempt"]) for e in evs if e.type == "ActivityCompleted")
        if any(n > 1 for n in applied.values()):
            problems.append(f"{iid}: an activity result applied twice: {applied}")
        st = last_state.get(iid)
        if st is None or st["status"] != Status.COMPLETED:
            problems.append(f"{iid}: last state record {st and st['status']}")
        elif {k: v for k, v in st["internal"].items() if k != EVENTS_OFFSET} != fold(evs, defs):  # an offset, not folded
            problems.append(f"{iid}: last engine-state record differs from the fold of its events")
        elif public.get(iid) != {k: v for k, v in st.items() if k not in ("internal", EVENTS_OFFSET)}:
            problems.append(f"{iid}: last public state record {public.get(iid)} does not match its engine state")
    assert not problems, f"{len(problems)} of {len(started)} instances wrong:\n" + "\n".join(problems[:20])


def describe(st) -> str:
    if st is None:
        return "no state record"
    internal = st.get("internal") or {}
    return (f"{st['status']} seq={st['seq']} activities={internal.get('activities')} timers={internal.get('timers')} "
            f"children={internal.get('children')} threads={ {k: v.get('wait') for k, v in internal.get('threads', {}).items()} }")


def run_matrix(bootstrap: str, tmp_path, engine_kills: int, worker_kills: int, instances: int,
               engines: int = 1) -> None:
    """With ``engines`` > 1, each engine kill is a rebalance: the group has one member less until the
    replacement (new process, new state directory) joins, so partitions move while load runs."""
    prefix = f"cm{uuid.uuid4().hex[:8]}."
    cfg = KafkaConfig(bootstrap=bootstrap, topic_prefix=prefix, partitions=PARTITIONS, dev_tuning=True)
    rnd = random.Random(20261123)
    state_dir = str(tmp_path / "engine")
    # Restarts of the single engine use static membership (the restarted engine takes its
    # partitions back at once). Rebalance mode runs engines as dynamic members, so every kill and
    # every replacement moves partitions between processes.
    env = {"KFLOW_STATIC_MEMBERSHIP": "false" if engines > 1 else "true"}
    procs = {"engine": engine_process(bootstrap, prefix, state_dir, partitions=PARTITIONS, engine_id="cm",
                                      workflows="tests.fault.flows", extra_env=env).start(),
             "worker": worker_process(bootstrap, prefix, ["tests.fault.flows"], partitions=PARTITIONS).start()}
    for n in range(1, engines):
        procs[f"engine{n}"] = engine_process(bootstrap, prefix, f"{state_dir}-{n}", partitions=PARTITIONS,
                                             engine_id=f"cm{n}", workflows="tests.fault.flows",
                                             extra_env=env).start()
    started: dict[str, tuple[str, int]] = {}
    kills = Counter()
    try:
        ensure_topics(cfg.client_conf(), cfg.names, cfg.topic_settings)  # engines may not have yet
        with Client(bootstrap, config=cfg) as client:
            for d in DEFS:
                client.deploy(d)
            client.start("f.chain", 0, id="warm-" + prefix).result(timeout=120)

            def killer() -> None:
                plan = ["engine"] * engine_kills + ["worker"] * worker_kills
                rnd.shuffle(plan)
                for who in plan:
                    time.sleep(rnd.uniform(0.3, 1.2))  # a random moment under load, not synchronisation
                    if who == "engine" and engines > 1:
                        victim = rnd.choice(sorted(k for k in procs if k.startswith("engine")))
                        identity = procs[victim].env["KFLOW_ENGINE_ID"]
                        procs[victim].kill()
                        kills[who] += 1
                        del procs[victim]
                        n = kills["engine"]
                        # the replacement takes the victim's identity (a StatefulSet pod coming back
                        # on a new disk): its transactional id fences the victim's open transaction
                        procs[f"engine-r{n}"] = engine_process(bootstrap, prefix, f"{state_dir}-r{n}", partitions=PARTITIONS,
                                                               engine_id=identity, workflows="tests.fault.flows",
                                                               extra_env=env).start()
                        continue
                    procs[who].kill()
                    kills[who] += 1
                    if who == "engine":
                        fresh = kills["engine"] % 3 == 0  # every third restart also loses its disk
                        d = state_dir + (f"-fresh{kills['engine']}" if fresh else "")
                        procs[who] = engine_process(bootstrap, prefix, d, partitions=PARTITIONS, engine_id="cm",
                                                    workflows="tests.fault.flows", extra_env=env).start()
                    else:
                        procs[who] = worker_process(bootstrap, prefix, ["tests.fault.flows"], partitions=PARTITIONS).start()

            k = threading.Thread(target=killer, daemon=True)
            k.start()
            for i in range(instances):
                wf = WORKFLOWS[i % len(WORKFLOWS)]
                iid = f"{wf}-{i}-{uuid.uuid4().hex[:4]}"
                client.start(wf, i, id=iid)
                started[iid] = (wf, i)
                if not k.is_alive():
                    break
                time.sleep(0.02)  # steady load
            k.join()
            done = client.wait_many(list(started), timeout=120)
            if len(done) != len(started):
                lost = sorted(set(started) - set(done))
                detail = "\n".join(f"{iid}: {describe(client.status(iid))}" for iid in lost[:10])
                raise AssertionError(f"{len(lost)} instances unfinished after {dict(kills)} kills:\n{detail}\n"
                                     "engine logs:\n" + "\n".join(f"--- {k}\n{p.log_tail(1500)}" for k, p in procs.items() if k.startswith("engine")))
        oracle(bootstrap, prefix, started)
        assert kills["engine"] == engine_kills and kills["worker"] == worker_kills
    finally:
        for p in procs.values():
            p.kill()


@pytest.fixture
def tansu_gap(kafka_flavor, request):
    if kafka_flavor == "tansu":
        request.node.add_marker(pytest.mark.xfail(
            reason="Tansu 0.6 shows aborted-transaction records to read_committed readers, so a kill "
                   "inside a transaction can leave its outputs visible; passes on Apache Kafka", strict=False))


def recorded(name: str, fn, *args, **kw) -> None:
    """Run ``fn``; if it fails, keep the failure in ``tests/artifacts/`` (an xfail hides it)."""
    try:
        fn(*args, **kw)
    except BaseException as e:
        out = Path(__file__).resolve().parents[1] / "artifacts"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.txt").write_text(f"{type(e).__name__}: {e}\n")
        raise


@pytest.mark.fault
def test_crash_matrix(kafka_bootstrap, tmp_path, tansu_gap):
    recorded("crash-matrix", run_matrix, kafka_bootstrap, tmp_path, engine_kills=20, worker_kills=6, instances=400)


@pytest.mark.fault
def test_rebalance_under_load(kafka_bootstrap, tmp_path, tansu_gap):
    recorded("rebalance", run_matrix, kafka_bootstrap, tmp_path, engine_kills=4, worker_kills=2, instances=200,
             engines=3)


@pytest.mark.slow
def test_crash_matrix_long(kafka_bootstrap, tmp_path, tansu_gap):
    run_matrix(kafka_bootstrap, tmp_path, engine_kills=60, worker_kills=20, instances=1500)
