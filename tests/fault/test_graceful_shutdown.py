"""SIGTERM under load: engines and workers stop gracefully, restart, and nothing is lost or doubled.

The same oracle as the crash matrix checks the outcome from the input topics: every instance has
exactly one terminal event with the expected result, gap-free sequence numbers, the last state
record equals the fold of its events, and no activity result was applied twice. A graceful stop
must also exit 0, close its stores cleanly (the restarted engine reuses the same state directory)
and log no traceback.
"""

from __future__ import annotations

import threading
import time
import uuid

from kflow.client import Client
from kflow.config import KafkaConfig
from kflow.dev.procs import engine_process, worker_process
from kflow.streams.topics import ensure_topics
from tests.fault.flows import DEFS
from tests.fault.test_crash_matrix import PARTITIONS, WORKFLOWS, describe, oracle

INSTANCES = 60


def test_sigterm_under_load_loses_nothing(kafka_bootstrap, tmp_path):
    prefix = f"gs{uuid.uuid4().hex[:8]}."
    cfg = KafkaConfig(bootstrap=kafka_bootstrap, topic_prefix=prefix, partitions=PARTITIONS, dev_tuning=True)
    state_dir = str(tmp_path / "engine")

    def new_engine():
        return engine_process(kafka_bootstrap, prefix, state_dir, partitions=PARTITIONS, engine_id="gs",
                              workflows="tests.fault.flows").start()

    def new_worker():
        return worker_process(kafka_bootstrap, prefix, ["tests.fault.flows"], partitions=PARTITIONS).start()

    procs = {"engine": new_engine(), "worker": new_worker()}
    stopped: list[tuple[str, int | None, str]] = []
    started: dict[str, tuple[str, int]] = {}
    try:
        ensure_topics(cfg.client_conf(), cfg.names, cfg.topic_settings)  # engines may not have yet
        with Client(kafka_bootstrap, config=cfg) as client:
            for d in DEFS:
                client.deploy(d)
            client.start("f.chain", 0, id="warm-" + prefix).result(timeout=120)

            def restarter() -> None:
                # two engine restarts and one worker restart, each while instances are in flight
                for n, who in enumerate(("engine", "worker", "engine")):
                    old = procs[who]
                    # stop each process only once it works (its partitions assigned) and load runs
                    while len(started) < 12 * (n + 1) or "assigned" not in old.log_tail(20_000):
                        time.sleep(0.05)  # waits for progress, not for an outcome
                    code = old.stop(timeout=30)
                    stopped.append((who, code, old.log_tail(6000)))
                    procs[who] = new_engine() if who == "engine" else new_worker()

            r = threading.Thread(target=restarter, daemon=True)
            r.start()
            for i in range(INSTANCES):
                wf = WORKFLOWS[i % len(WORKFLOWS)]
                iid = f"{wf}-{i}-{uuid.uuid4().hex[:4]}"
                client.start(wf, i, id=iid)
                started[iid] = (wf, i)
                time.sleep(0.03)  # steady load
            r.join(120)
            assert not r.is_alive(), "restarts did not finish"
            done = client.wait_many(list(started), timeout=120)
            if len(done) != len(started):
                lost = sorted(set(started) - set(done))
                detail = "\n".join(f"{iid}: {describe(client.status(iid))}" for iid in lost[:10])
                raise AssertionError(f"{len(lost)} instances unfinished:\n{detail}\n"
                                     + procs["engine"].log_tail(2000))
        for who, code, log in stopped:
            assert code == 0, f"{who} did not exit cleanly ({code}):\n{log}"
            assert "Traceback" not in log, log
            assert "stopping gracefully" in log and "stopped" in log, log
        assert [w for w, _, _ in stopped] == ["engine", "worker", "engine"]
        oracle(kafka_bootstrap, prefix, started)
    finally:
        for p in procs.values():
            p.kill()
