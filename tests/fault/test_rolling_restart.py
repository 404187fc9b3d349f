"""Rolling restart of three engines under load: each engine in turn is stopped gracefully (SIGTERM)
and started again on its state directory while instances keep starting; nothing is lost or doubled.

The crash-matrix oracle checks the outcome from the input topics (exactly one terminal event with
the expected result per instance, gap-free sequence numbers, last state record = fold of the
events, no activity result applied twice). The latency each instance saw (its first to its last
event, engine clock) is printed for instances started before the first restart and for those
started during the restarts: the added latency is reported, never asserted.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict

import pytest

from kflow.client import Client
from kflow.config import KafkaConfig
from kflow.dev.bench import _pct
from kflow.dev.procs import KflowProcess, engine_process, worker_process
from kflow.schemas.codec import decode_event
from kflow.streams.topics import ensure_topics
from tests.fault.flows import DEFS
from tests.fault.test_crash_matrix import PARTITIONS, WORKFLOWS, describe, oracle, read_all

ENGINES = 3
BASELINE = 24  # instances started before the first restart
MAX_INSTANCES = 400


def _assigned(proc: KflowProcess) -> bool:
    return "assigned partitions" in proc.log_tail(50_000)


def _latencies(bootstrap: str, prefix: str, ids: list[str]) -> list[float]:
    span: dict[str, list[int]] = defaultdict(list)
    wanted = set(ids)
    for m in read_all(bootstrap, f"{prefix}events"):
        ev = decode_event(m.value())
        if ev.instance_id in wanted:
            span[ev.instance_id].append(ev.ts)
    return sorted(max(ts) - min(ts) for ts in span.values() if ts)


@pytest.mark.xfail(reason="seen before two fixes, not since: under the parallel full run an engine stopped right "
                   "after a revoke sometimes exited 1 with 'partition N is not assigned to this engine' (records of a "
                   "revoked partition reaching a lane: lanes now drop them, and a record polled before a revoke is "
                   "dropped); kept until more runs prove them; the outcome oracle is unaffected", strict=False)
def test_rolling_restart_of_three_engines_under_load(kafka_bootstrap, tmp_path):
    prefix = f"rr{uuid.uuid4().hex[:8]}."
    cfg = KafkaConfig(bootstrap=kafka_bootstrap, topic_prefix=prefix, partitions=PARTITIONS, dev_tuning=True)

    def new_engine(n: int) -> KflowProcess:
        return engine_process(kafka_bootstrap, prefix, str(tmp_path / f"engine{n}"), partitions=PARTITIONS,
                              engine_id=f"rr{n}", workflows="tests.fault.flows").start()

    engines = [new_engine(n) for n in range(ENGINES)]
    worker = worker_process(kafka_bootstrap, prefix, ["tests.fault.flows"], partitions=PARTITIONS).start()
    stopped: list[tuple[int, int | None, str]] = []
    started: dict[str, tuple[str, int]] = {}
    baseline: list[str] = []
    rolling: list[str] = []
    try:
        ensure_topics(cfg.client_conf(), cfg.names, cfg.topic_settings)  # engines may not have yet
        with Client(kafka_bootstrap, config=cfg) as client:
            for d in DEFS:
                client.deploy(d)
            client.start("f.chain", 0, id="warm-" + prefix).result(timeout=120)
            deadline = time.monotonic() + 120
            while not all(_assigned(e) for e in engines):  # every engine owns work before the first stop
                assert time.monotonic() < deadline, "engines never all assigned:\n" + engines[0].log_tail(3000)
                time.sleep(0.1)
            restarting = threading.Event()

            def restarter() -> None:
                while len(started) < BASELINE:
                    time.sleep(0.05)  # waits for load, not for an outcome
                restarting.set()
                for n in range(ENGINES):
                    old = engines[n]
                    code = old.stop(timeout=60)
                    stopped.append((n, code, old.log_tail(6000)))
                    engines[n] = new_engine(n)
                    until = time.monotonic() + 120
                    while not _assigned(engines[n]) and time.monotonic() < until:
                        time.sleep(0.1)

            r = threading.Thread(target=restarter, daemon=True)
            r.start()
            i = 0
            while (r.is_alive() or i < BASELINE) and i < MAX_INSTANCES:
                wf = WORKFLOWS[i % len(WORKFLOWS)]
                iid = f"{wf}-{i}-{uuid.uuid4().hex[:4]}"
                (rolling if restarting.is_set() else baseline).append(iid)
                client.start(wf, i, id=iid)
                started[iid] = (wf, i)
                i += 1
                time.sleep(0.05)  # steady load
            r.join(300)
            assert not r.is_alive(), "the rolling restart did not finish"
            done = client.wait_many(list(started), timeout=180)
            if len(done) != len(started):
                lost = sorted(set(started) - set(done))
                detail = "\n".join(f"{iid}: {describe(client.status(iid))}" for iid in lost[:10])
                raise AssertionError(f"{len(lost)} instances unfinished:\n{detail}\n"
                                     + "\n".join(e.log_tail(2000) for e in engines))
        for n, code, log in stopped:
            assert code == 0, f"engine {n} did not exit cleanly ({code}):\n{log}"
            assert "Traceback" not in log, log
        assert [n for n, _, _ in stopped] == list(range(ENGINES))
        assert all(_assigned(e) for e in engines), "a restarted engine never owned partitions again"
        assert rolling, "no instance was started during the rolling restart"
        oracle(kafka_bootstrap, prefix, started)
        base, roll = _latencies(kafka_bootstrap, prefix, baseline), _latencies(kafka_bootstrap, prefix, rolling)
        print(f"\nrolling restart of {ENGINES} engines: {len(baseline)} instances before it, p50 "
              f"{_pct(base, 0.5)} ms, p99 {_pct(base, 0.99)} ms; {len(rolling)} during it, p50 {_pct(roll, 0.5)} ms, "
              f"p99 {_pct(roll, 0.99)} ms, max {roll[-1]} ms")
    finally:
        for p in [*engines, worker]:
            p.kill()
