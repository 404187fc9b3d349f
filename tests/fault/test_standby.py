"""Standby replicas: a SIGKILLed engine's partitions are promoted from warm copies, never from stale ones.

Both tests run real engines with ``KFLOW_STANDBY_REPLICAS=1`` and a worker on the test broker, and
check the outcome with the crash-matrix oracle (every instance completed exactly once, its last
state equal to the fold of its events).

* Takeover under load (``-m fault``: a SIGKILL inside a transaction is where the embedded broker
  breaks exactly-once, see the crash matrix): two engine processes; once the survivor's copies of the other's partitions
  have caught up (``kflow_standby_lag_records`` 0), the other is SIGKILLed half way through a
  steady load. The survivor promotes its copies, replaying only the tail (fewer records than the
  changelog partition holds, read from its "promoted standby partition" log lines). Pauses are
  printed (``-s``), not asserted.
* A standby that fell behind: the standby engine runs in this process so its tailer can be stalled
  (it stops polling, as in a paused process) while the active keeps committing: instances complete, others reach a signal wait. The active is SIGKILLed when idle;
  the promotion must replay the tail first (records > 0), the waiting instances then take their
  signals on the promoted state, and after a graceful stop every store equals a fresh full restore
  of the changelog.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections import Counter, defaultdict
from typing import Optional

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from kflow.client import Client
from kflow.config import EngineConfig, KafkaConfig
from kflow.dev.bench import _pct
from kflow.dev.failover import LogWatch, restore_into, wait_for
from kflow.dev.procs import KflowProcess, engine_process, worker_process
from kflow.model.errors import KflowError
from kflow.schemas.codec import decode_engine_state
from kflow.streams import standby as standby_module
from kflow.streams.partitioner import partition_for
from kflow.streams.processor import EngineProcessor
from kflow.streams.restore import end_offsets
from kflow.streams.store import EngineStore
from kflow.streams.topics import ensure_topics
from kflow.testing import assert_eventually
from tests.fault.flows import DEFS
from tests.fault.test_crash_matrix import WORKFLOWS, oracle, read_all, tansu_gap  # noqa: F401 (a fixture)
from tests.fault.test_failover import pauses
from tests.net import free_port, http_get

PARTITIONS = 4
PROMOTED = re.compile(r"promoted standby partition (?P<p>\d+): replayed (?P<n>\d+) records .*changelog offsets "
                      r"(?P<start>\d+)\.\.(?P<end>\d+)")
STANDBY = {"KFLOW_STANDBY_REPLICAS": "1"}
WAIT_DEF = {"name": "s.wait", "version": 1, "steps": [
    {"id": "a", "task": "f.inc", "input": "input", "output": "a"},
    {"id": "w", "wait": {"signal": "go"}, "output": "g"},
    {"id": "done", "succeed": "a + g"}]}


def standby_lag(metrics_port: int) -> dict[int, float]:
    """``kflow_standby_lag_records`` per partition as an engine process exports it."""
    status, body = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
    if status != 200:
        return {}
    return {int(s.labels["partition"]): s.value for fam in text_string_to_metric_families(body)
            if fam.name == "kflow_standby_lag_records" for s in fam.samples}


def changelog_records(bootstrap: str, prefix: str) -> tuple[Counter[int], dict[str, dict], dict[str, list[float]]]:
    """Records per partition of the ``engine-state`` changelog, the latest state per instance and record times."""
    per_partition: Counter[int] = Counter()
    latest: dict[str, dict] = {}
    times: dict[str, list[float]] = defaultdict(list)
    for m in read_all(bootstrap, f"{prefix}engine-state"):
        per_partition[m.partition()] += 1
        latest[m.key().decode()] = decode_engine_state(m.value())[1]
        times[m.key().decode()].append(m.timestamp()[1] / 1000)
    return per_partition, latest, times


@pytest.mark.fault
def test_takeover_promotes_warm_copies_replaying_only_the_tail(kafka_bootstrap, tmp_path, tansu_gap):  # noqa: F811 (a fixture imported above)
    prefix = f"sb{uuid.uuid4().hex[:8]}."
    cfg = KafkaConfig(bootstrap=kafka_bootstrap, topic_prefix=prefix, partitions=PARTITIONS, dev_tuning=True)
    ports = {"a": free_port(), "b": free_port()}

    def engine(identity: str, state: str, port: int = 0) -> KflowProcess:
        p = engine_process(kafka_bootstrap, prefix, str(tmp_path / state), partitions=PARTITIONS, engine_id=identity,
                           workflows="tests.fault.flows", metrics_port=port, extra_env=STANDBY)
        p.log_path = str(tmp_path / f"{state}.log")
        return p.start()

    survivor, victim = engine("sa", "a", ports["a"]), engine("sb", "b", ports["b"])
    procs = [survivor, victim,
             worker_process(kafka_bootstrap, prefix, ["tests.fault.flows"], partitions=PARTITIONS).start()]
    wa, wb = LogWatch(survivor), LogWatch(victim)
    started: dict[str, tuple[str, int]] = {}
    started_at: dict[str, float] = {}
    replaced = False
    try:
        wait_for("both engines to own partitions", lambda: wa.owning() and wb.owning()
                 and len(wa.owning() | wb.owning()) == PARTITIONS, 120, procs)
        theirs = wb.owning()
        ensure_topics(cfg.client_conf(), cfg.names, cfg.topic_settings)  # engines may not have yet
        with Client(kafka_bootstrap, config=cfg) as client:
            for d in DEFS:
                client.deploy(d)
            warm = [client.start("f.chain", i, id=f"warm-{i}-{prefix}") for i in range(8)]
            for h in warm:
                h.result(timeout=120)

            def caught_up() -> bool:
                lag = standby_lag(ports["a"])
                return set(lag) >= theirs and all(lag[p] == 0 for p in theirs)

            wait_for("the survivor's copies of the victim's partitions to catch up", caught_up, 60, procs)
            print(f"\nstandby: survivor owns {sorted(wa.owning())}, keeps {sorted(theirs)} warm with lag 0")
            instances, kill_at = 240, 0.0
            for i in range(instances):
                if i == instances // 2:
                    kill_at = time.time()
                    victim.kill()
                wf = WORKFLOWS[i % len(WORKFLOWS)]
                iid = f"{wf}-{i}-{uuid.uuid4().hex[:4]}"
                started_at[iid] = time.time()
                client.start(wf, i, id=iid)
                started[iid] = (wf, i)
                time.sleep(0.02)  # steady load, not synchronisation

            def promoted_all() -> bool:
                wa.scan()
                return {pr.partition for pr in wa.promotions if pr.at >= kill_at} >= theirs

            try:
                wait_for("the survivor to promote the victim's partitions", promoted_all, 25, [survivor])
            except KflowError:
                # the embedded broker never aborts the dead engine's open transaction by timeout, so
                # the promotion's replay waits for it; the dead identity coming back fences it
                replaced = True
                procs.append(engine("sb", "b-replacement"))
                wait_for("the survivor to promote the victim's partitions", promoted_all, 120, [survivor])
            done = client.wait_many(list(started), timeout=30 if not replaced else 180)
            if len(done) < len(started) and not replaced:
                replaced = True  # an open transaction holding back a commands partition: the same remedy
                procs.append(engine("sb", "b-replacement"))
                done = client.wait_many(list(started), timeout=180)
            assert len(done) == len(started), f"{len(started) - len(done)} instances unfinished:\n" + \
                survivor.log_tail(3000)
        oracle(kafka_bootstrap, prefix, started)

        per_partition, _latest, times = changelog_records(kafka_bootstrap, prefix)
        promotions = {}
        for pr in wa.promotions:
            if pr.at >= kill_at and pr.partition in theirs:
                promotions.setdefault(pr.partition, pr)
        gaps = pauses(started_at, times, kill_at)
        print(f"takeover with a standby: {len(gaps)} instances in flight at the kill; pause max "
              f"{max(gaps, default=0):.2f}s, p99 {_pct(gaps, 0.99):.2f}s, p50 {_pct(gaps, 0.50):.2f}s; promotions "
              + ", ".join(f"p{p}: replayed {pr.records} of {per_partition[p]} records in {pr.seconds:.2f}s"
                          for p, pr in sorted(promotions.items()))
              + ("; the dead identity was restarted to fence its open transaction" if replaced else ""))
        for p, pr in promotions.items():
            assert pr.records < per_partition[p], f"partition {p}: promotion replayed the whole changelog"
    finally:
        for p in procs:
            p.kill()


def _sample(name: str, partition: Optional[int] = None) -> Optional[float]:
    return REGISTRY.get_sample_value(name, {"partition": str(partition)} if partition is not None else {})


def test_a_standby_that_fell_behind_is_promoted_only_after_replaying_the_tail(kafka_bootstrap, tmp_path, caplog,
                                                                              monkeypatch):
    stalled, never = threading.Event(), threading.Event()
    real_drain = standby_module._drain

    def drain(consumer):
        if stalled.is_set():  # a stalled tailer: no poll, so its position and stores stay where they are
            never.wait(standby_module.POLL_SECONDS)  # as long as a poll that brings nothing
            return []
        return real_drain(consumer)

    monkeypatch.setattr(standby_module, "_drain", drain)
    prefix = f"sl{uuid.uuid4().hex[:8]}."
    cfg = KafkaConfig(bootstrap=kafka_bootstrap, topic_prefix=prefix, partitions=PARTITIONS, dev_tuning=True)
    active = engine_process(kafka_bootstrap, prefix, str(tmp_path / "active"), partitions=PARTITIONS,
                            engine_id="sl-active", workflows="tests.fault.flows", extra_env=STANDBY)
    active.log_path = str(tmp_path / "active.log")
    procs = [active.start(), worker_process(kafka_bootstrap, prefix, ["tests.fault.flows"], partitions=PARTITIONS).start()]
    wactive = LogWatch(active)
    standby = EngineProcessor(EngineConfig(bootstrap=kafka_bootstrap, topic_prefix=prefix, partitions=PARTITIONS,
                                           dev_tuning=True, state_dir=str(tmp_path / "standby"), engine_id="sl-standby",
                                           workflows="tests.fault.flows", standby_replicas=1, metrics_port=0))
    caplog.set_level(logging.INFO, logger="kflow.engine")
    thread = threading.Thread(target=standby.run, name="standby-engine", daemon=True)
    thread.start()
    try:
        assert standby.ready.wait(120)  # the engines created the topics
        ensure_topics(cfg.client_conf(), cfg.names, cfg.topic_settings)  # engines may not have yet
        with Client(kafka_bootstrap, config=cfg) as client:
            for d in [*DEFS, WAIT_DEF]:
                client.deploy(d)
            wait_for("both engines to own partitions", lambda: wactive.owning() and standby.store.partitions
                     and len(wactive.owning() | set(standby.store.partitions.copy())) == PARTITIONS, 120, procs)
            theirs = sorted(wactive.owning())
            assert standby.standby is not None
            state_topic = f"{prefix}engine-state"  # the changelog the standby tails

            def ids(kind: str, n: int) -> list[str]:
                out, i = [], 0
                while len(out) < n:
                    iid = f"{kind}-{i}-{prefix}"
                    if partition_for(iid, PARTITIONS) in theirs:
                        out.append(iid)
                    i += 1
                return out

            warm = {iid: ("f.chain", i) for i, iid in enumerate(ids("warm", 8))}
            for iid, (wf, x) in warm.items():
                client.start(wf, x, id=iid)
            assert len(client.wait_many(list(warm), timeout=60)) == len(warm)

            def caught_up() -> bool:
                stored = standby.standby.stores.stored_offsets()
                return all(stored.get((state_topic, p), 0) > 0 and _sample("kflow_standby_lag_records", p) == 0
                           for p in theirs)

            assert_eventually(caught_up, timeout=60, msg="the standby's copies of the active's partitions caught up")
            stalled.set()  # from now on the standby's tailer reads nothing, as if its process were paused

            chains, waits = ids("chain", 30), ids("wait", 10)
            started = {iid: ("f.chain", i) for i, iid in enumerate(chains)}
            for iid, (wf, x) in started.items():
                client.start(wf, x, id=iid)
            for i, iid in enumerate(waits):
                client.start("s.wait", i, id=iid)
            assert len(client.wait_many(chains, timeout=60)) == len(chains)
            # every waiting instance has recorded its activity's result: the active holds no open transaction
            assert_eventually(lambda: all(((client.status(iid) or {}).get("internal") or {}).get("vars", {}).get("a")
                                          is not None for iid in waits), timeout=60)
            # a paused partition is not fetched, so its exported lag is frozen: compare with the changelog
            stored = standby.standby.stores.stored_offsets()
            highs = end_offsets(cfg.consumer_conf("test"), state_topic, theirs)
            behind = {p: highs[p][1] - stored[(state_topic, p)] for p in theirs}
            assert sum(behind.values()) > 0, behind
            kill_at = time.time()
            active.kill()

            def promotions() -> dict[int, tuple[int, int, int]]:
                """(records, from, to offset) per promoted partition of the active's, logged after the kill."""
                found = [PROMOTED.search(r.getMessage()) for r in list(caplog.records) if r.created >= kill_at]
                return {int(m["p"]): (int(m["n"]), int(m["start"]), int(m["end"])) for m in found
                        if m and int(m["p"]) in theirs}

            replayed = assert_eventually(lambda: (got := promotions()) and set(got) == set(theirs) and got,
                                         timeout=90, msg="the standby promoted the active's partitions")
            print(f"\nstale standby: {behind} offsets behind when the active was killed; promotions replayed "
                  f"(records, from, to) {replayed} ({time.time() - kill_at:.2f}s after the kill)")
            for p, (_records, start, end) in replayed.items():
                # from the stale copy's own offset to where the dead active left the changelog
                assert (start, end) == (stored[(state_topic, p)], highs[p][1]), (p, replayed[p])
            assert sum(n for n, _, _ in replayed.values()) > 0
            for iid in waits:
                client.signal(iid, "go", 100)
            results = client.wait_many(waits, timeout=60)
            assert {iid: r["result"] for iid, r in results.items()} == {iid: i + 1 + 100 for i, iid in enumerate(waits)}
            more = {f"after-{i}-{prefix}": ("f.chain", 1000 + i) for i in range(12)}
            for iid, (wf, x) in more.items():
                client.start(wf, x, id=iid)
            assert len(client.wait_many(list(more), timeout=60)) == len(more)
        oracle(kafka_bootstrap, prefix, {**warm, **started, **more})

        standby.stop()
        thread.join(60)
        assert not thread.is_alive()
        _records, _seconds, fresh = restore_into(cfg, str(tmp_path / "fresh"))
        stores = EngineStore(str(tmp_path / "standby"), 0)
        try:
            for p in range(PARTITIONS):
                assert dict(stores.open(p, 0).iter_states()) == dict(fresh.get(p).iter_states()), \
                    f"partition {p}: promoted store != a full restore of the changelog"
        finally:
            stores.close_all()
            fresh.close_all()
    finally:
        standby.stop()
        thread.join(60)
        for p in procs:
            p.kill()
