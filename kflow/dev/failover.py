"""``kflow bench --failover``: how long workflows stand still when an engine dies, and how fast restore is.

Three measurements on a real stack (engines and the worker are separate processes, each engine
with its own state directory):

* *takeover*: chain3 under steady load on two engines, one SIGKILLed. For every instance in
  flight at the kill, the pause is the gap between its last progress record (a record on the
  ``state`` topic, or its start) before the kill and its first one after; printed as max/p99/p50
  with the time from the kill to the survivor owning every partition. With ``standby`` replicas
  (``KFLOW_STANDBY_REPLICAS`` on both engines) it also prints how many changelog records the
  survivor replayed to promote its warm copies of the dead engine's partitions.
* *replacement*: one engine SIGKILLed and replaced at once by a process with the same
  ``KFLOW_ENGINE_ID`` on a fresh state directory: spawn → owning its partitions → serving (first
  progress record), and its restore time.
* *restore*: synthetic instance states written to a ``state`` changelog, restored into empty
  stores by :func:`~kflow.streams.restore.restore_partitions`; records and seconds per size.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Optional

from confluent_kafka import Consumer, Producer, TopicPartition
from rich.console import Console

from kflow.client import Client
from kflow.config import KafkaConfig
from kflow.dev.bench import _pct
from kflow.dev.broker import EmbeddedBroker
from kflow.dev.procs import KflowProcess, engine_process, worker_process
from kflow.dev.stack import bundled_spec
from kflow.model.errors import KflowError
from kflow.model.messages import Command, Status
from kflow.schemas.codec import decode_state, encode_command, encode_engine_state
from kflow.streams.partitioner import partition_for
from kflow.streams.restore import restore_partitions
from kflow.streams.store import EngineStore
from kflow.streams.topics import ensure_topics

WORKFLOW = "bench.chain3"
_ASSIGNED = re.compile(r"assigned partitions \[([\d, ]*)\]")
_RESTORED = re.compile(r"restored in ([\d.]+)s")
_RESTORED_RECORDS = re.compile(r"restored (\d+) state (?:and journal )?records")
_PROMOTED = re.compile(r"promoted standby partition (\d+): replayed (\d+) records in ([\d.]+)s")
_TIME = re.compile(r'"time": "([\d-]+ [\d:]+,\d+)"')


# --------------------------------------------------------------------------- watching processes


def _logged_at(line: str, default: float) -> float:
    """When a JSON log line was written (its ``time`` field, local time), else ``default``."""
    t = _TIME.search(line)
    if t is None:
        return default
    return datetime.strptime(t.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


@dataclass(frozen=True)
class Promotion:
    """A standby copy taken over: the changelog records its promotion replayed, and how long it took."""

    at: float
    partition: int
    records: int
    seconds: float


class LogWatch:
    """Follows an engine's log; records when it first owned every partition after a moment, and its promotions."""

    def __init__(self, proc: KflowProcess) -> None:
        self.proc = proc
        self._pos = 0
        self.events: list[tuple[float, set[int], Optional[float]]] = []  # (seen at, assigned, restore s)
        self.promotions: list[Promotion] = []
        self.restores: list[tuple[float, int]] = []  # (seen at, changelog records read)

    def scan(self) -> None:
        try:
            with open(self.proc.log_path, "rb") as f:
                f.seek(self._pos)
                data = f.read()
        except OSError:
            return
        cut = data.rfind(b"\n") + 1
        self._pos += cut
        now = time.time()
        for line in data[:cut].decode("utf-8", "replace").splitlines():
            rr = _RESTORED_RECORDS.search(line)
            if rr:
                self.restores.append((_logged_at(line, now), int(rr.group(1))))
            pm = _PROMOTED.search(line)
            if pm:
                self.promotions.append(Promotion(_logged_at(line, now), int(pm.group(1)), int(pm.group(2)),
                                                 float(pm.group(3))))
            m = _ASSIGNED.search(line)
            if m:
                r = _RESTORED.search(line)
                parts = {int(x) for x in m.group(1).split(",") if x.strip()}
                self.events.append((_logged_at(line, now), parts, float(r.group(1)) if r else None))

    def owning(self) -> set[int]:
        self.scan()
        return self.events[-1][1] if self.events else set()

    def owned_all_at(self, partitions: int, after: float) -> Optional[tuple[float, Optional[float]]]:
        """(when, restore seconds) of the first assignment of every partition seen after ``after``."""
        self.scan()
        for seen, parts, restored in self.events:
            if seen >= after and len(parts) == partitions:
                return seen, restored
        return None


def wait_for(what: str, check: Any, timeout: float, procs: list[KflowProcess]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        for p in procs:
            if not p.alive():
                raise KflowError(f"{p.args[0]} exited while waiting for {what}:\n{p.log_tail(2000)}")
        time.sleep(0.02)  # polling a log file and a local consumer, not synchronising with the stack
    raise KflowError(f"timed out after {timeout:.0f}s waiting for {what}")


# --------------------------------------------------------------------------- load and progress


class Load:
    """Starts chain3 instances at a steady rate and records every progress record's timestamp."""

    def __init__(self, cfg: KafkaConfig) -> None:
        self.cfg = cfg
        self.producer = Producer(cfg.producer_conf(**{"linger.ms": 1}))
        self.consumer = Consumer(cfg.consumer_conf(f"failover-{uuid.uuid4().hex[:6]}", **{"fetch.wait.max.ms": 5}))
        topic = cfg.names.state
        tps = []
        for p in range(cfg.partitions):
            _, high = self.consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)
            tps.append(TopicPartition(topic, p, high))
        self.consumer.assign(tps)
        self.progress: dict[str, list[float]] = {}  # instance -> start time, then record times (s)
        self.closed: dict[str, float] = {}
        self.sent = 0
        self.tag = uuid.uuid4().hex[:6]

    def start_one(self) -> None:
        iid = f"fo{self.tag}-{self.sent}"
        self.progress[iid] = [time.time()]
        self.producer.produce(self.cfg.names.commands, encode_command(
            Command("StartWorkflow", iid, {"workflow": WORKFLOW, "version": None, "input": self.sent})), iid.encode())
        self.producer.poll(0)
        self.sent += 1

    def poll(self, timeout: float) -> None:
        for m in self.consumer.consume(1000, timeout):
            if m.error() or m.key() is None:
                continue
            iid = m.key().decode()
            points = self.progress.get(iid)
            if points is None:
                continue
            points.append(m.timestamp()[1] / 1000)
            if decode_state(m.value())["status"] in Status.TERMINAL:
                self.closed.setdefault(iid, points[-1])

    def run(self, rate: float, seconds: float, at_half: Any = None) -> None:
        """Start ``rate`` instances per second for ``seconds``; call ``at_half()`` half way."""
        t0 = time.monotonic()
        fired = at_half is None
        while (elapsed := time.monotonic() - t0) < seconds:
            while self.sent < int(elapsed * rate) + 1:
                self.start_one()
            if not fired and elapsed >= seconds / 2:
                at_half()
                fired = True
            self.poll(0.005)

    def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.closed) < len(self.progress) and time.monotonic() < deadline:
            self.poll(0.05)

    def pauses(self, kill: float) -> tuple[list[float], list[str]]:
        """Gap across ``kill`` of every instance in flight then; and instances that never moved after it."""
        gaps, stuck = [], []
        for iid, points in self.progress.items():
            points = sorted(points)
            closed = self.closed.get(iid)
            if points[0] > kill or (closed is not None and closed <= kill):
                continue
            before = max(p for p in points if p <= kill)
            after = [p for p in points if p > kill]
            if not after:
                stuck.append(iid)
                continue
            gaps.append(min(after) - before)
        return gaps, stuck

    def close(self) -> None:
        self.producer.flush(5)
        self.consumer.close()


# --------------------------------------------------------------------------- the runs


@dataclass
class FailoverResult:
    mode: str
    in_flight: int
    pause_max_s: float
    pause_p99_s: float
    pause_p50_s: float
    kill_to_owning_s: float
    unfinished: int
    extra: dict[str, float] = field(default_factory=dict)


class _Stack:
    """Broker (embedded unless given), engines and one worker on a fresh prefix."""

    def __init__(self, bootstrap: Optional[str], partitions: int, prefix: Optional[str]) -> None:
        self.root = tempfile.mkdtemp(prefix="kflow-failover-")
        self.broker: Optional[EmbeddedBroker] = None
        if bootstrap is None:
            self.broker = EmbeddedBroker(os.path.join(self.root, "broker"))
            bootstrap = self.broker.start()
        self.bootstrap = bootstrap
        self.prefix = prefix or f"fo{uuid.uuid4().hex[:6]}."
        self.partitions = partitions
        self.cfg = KafkaConfig(bootstrap=bootstrap, topic_prefix=self.prefix, partitions=partitions, dev_tuning=True)
        self.procs: list[KflowProcess] = []

    def engine(self, engine_id: str, state: str, static: bool = False, standby: int = 0) -> KflowProcess:
        p = engine_process(self.bootstrap, self.prefix, os.path.join(self.root, state), partitions=self.partitions,
                           engine_id=engine_id, extra_env={"KFLOW_STATIC_MEMBERSHIP": str(static).lower(),
                                                           "KFLOW_STANDBY_REPLICAS": str(standby)})
        p.log_path = os.path.join(self.root, f"{state}.log")
        self.procs.append(p.start())
        return p

    def worker(self) -> None:
        p = worker_process(self.bootstrap, self.prefix, ["kflow.dev.bench_activities"], partitions=self.partitions)
        p.log_path = os.path.join(self.root, "worker.log")
        self.procs.append(p.start())

    def warm(self) -> None:
        with Client(self.bootstrap, config=self.cfg) as client:
            client.deploy(bundled_spec("chain3.yaml"))
            client.start(WORKFLOW, 0, id=f"warm-{uuid.uuid4().hex[:6]}").result(timeout=120)

    def close(self) -> None:
        for p in self.procs:
            p.kill()
        if self.broker is not None:
            self.broker.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def run_takeover(stack: _Stack, rate: float = 100.0, seconds: float = 20.0,
                 blocked_after: float = 30.0, standby: int = 0) -> FailoverResult:
    """Two engines share the load; one is SIGKILLed half way (see the module docstring).

    When the survivor does not own every partition ``blocked_after`` seconds after the kill, its
    restore is waiting behind the dead engine's open transaction (a broker that never aborts it
    by timeout): the dead identity is restarted to fence it, and the result says so. With
    ``standby`` replicas the result also holds the records the survivor's promotions replayed."""
    a, b = stack.engine("fo-a", "a", standby=standby), stack.engine("fo-b", "b", standby=standby)
    stack.worker()
    wa, wb = LogWatch(a), LogWatch(b)
    # the engines create the topics (a client does not), so they own partitions before the deploy
    wait_for("both engines to own partitions", lambda: wa.owning() and wb.owning()
             and len(wa.owning() | wb.owning()) == stack.partitions, 120, stack.procs)
    stack.warm()
    load = Load(stack.cfg)
    kill_at: list[float] = []

    def kill() -> None:
        kill_at.append(time.time())
        b.kill()

    fenced = 0.0
    try:
        load.run(rate, seconds, kill)
        try:
            owned = wait_for("the survivor to own every partition",
                             lambda: wa.owned_all_at(stack.partitions, kill_at[0]), blocked_after, [a])
        except KflowError:
            # The survivor's restore waits behind the dead engine's open transaction: a broker
            # that never aborts it by timeout needs the dead identity back to fence it.
            fenced = time.time() - kill_at[0]
            stack.engine("fo-b", "b-replacement", standby=standby)
            owned = wait_for("the survivor to own every partition",
                             lambda: wa.owned_all_at(stack.partitions, kill_at[0]), 180, [a])
        load.drain(blocked_after)
        if len(load.closed) < len(load.progress) and not fenced:
            # read_committed readers (this one included) wait behind the same open transaction
            fenced = time.time() - kill_at[0]
            stack.engine("fo-b", "b-replacement", standby=standby)
        load.drain(120)
        gaps, stuck = load.pauses(kill_at[0])
    finally:
        load.close()
    extra = {"replacement_needed_after_s": round(fenced, 2)} if fenced else {}
    wa.scan()
    extra["restored_records"] = next((n for at, n in wa.restores if at >= kill_at[0]), 0)
    if standby:
        extra.update(_promotion_figures(wa, kill_at[0]))
    return FailoverResult("takeover" if not standby else f"takeover, {standby} standby", len(gaps) + len(stuck),
                          round(max(gaps, default=0), 2), round(_pct(gaps, 0.99), 2), round(_pct(gaps, 0.50), 2),
                          round(owned[0] - kill_at[0], 2), len(load.progress) - len(load.closed), extra)


def _promotion_figures(watch: LogWatch, kill: float) -> dict[str, float]:
    """The survivor's first promotion of each partition after the kill: how many, records replayed, longest."""
    watch.scan()
    first: dict[int, Promotion] = {}
    for pr in watch.promotions:
        if pr.at >= kill:
            first.setdefault(pr.partition, pr)
    return {"promoted_partitions": len(first), "replayed_records": sum(p.records for p in first.values()),
            "replayed_max_records": max((p.records for p in first.values()), default=0),
            "promotion_max_s": max((p.seconds for p in first.values()), default=0.0)}


def run_replacement(stack: _Stack, rate: float = 100.0, seconds: float = 20.0,
                    static: bool = True) -> FailoverResult:
    """One engine, SIGKILLed half way and replaced at once (same identity, fresh state directory)."""
    a = stack.engine("fo-r", "r0", static)
    stack.worker()
    wa = LogWatch(a)
    wait_for("the engine to own its partitions", lambda: len(wa.owning()) == stack.partitions, 120, stack.procs)
    stack.warm()
    load = Load(stack.cfg)
    spawned: list[tuple[float, LogWatch]] = []

    def replace() -> None:
        kill_at = time.time()
        a.kill()
        r = stack.engine("fo-r", "r1", static)
        spawned.append((kill_at, LogWatch(r)))

    try:
        load.run(rate, seconds, replace)
        kill_at, wr = spawned[0]
        owned = wait_for("the replacement to own its partitions", lambda: wr.owned_all_at(stack.partitions, 0), 180,
                         [wr.proc])
        load.drain(120)
        gaps, stuck = load.pauses(kill_at)
        serving = min((p for pts in load.progress.values() for p in pts[1:] if p > kill_at), default=kill_at)
    finally:
        load.close()
    return FailoverResult("replacement", len(gaps) + len(stuck), round(max(gaps, default=0), 2),
                          round(_pct(gaps, 0.99), 2), round(_pct(gaps, 0.50), 2), round(owned[0] - kill_at, 2),
                          len(load.progress) - len(load.closed),
                          {"spawn_to_owning_s": round(owned[0] - kill_at, 2),
                           "spawn_to_serving_s": round(serving - kill_at, 2),
                           "restore_s": owned[1] or 0.0})


# --------------------------------------------------------------------------- restore at scale


def synthetic_state(iid: str, i: int, now_ms: int, timers: bool = True) -> dict[str, Any]:
    """A running instance's internal state; with ``timers``, every third one has a pending timer."""
    st: dict[str, Any] = {"id": iid, "workflow": "bench.synthetic", "version": 1, "status": Status.RUNNING,
                          "seq": 2 if timers else 3, "started_ms": now_ms, "updated_ms": now_ms, "vars": {"x": i},
                          "timers": {}}
    if timers and i % 3 == 0:
        st["timers"] = {f"t{i}": {"due": now_ms + 3_600_000 + i}}
    return st


def write_states(cfg: KafkaConfig, n: int, tag: str = "", chunk: int = 20_000, timers: bool = True) -> None:
    """``n`` synthetic instance states on ``cfg``'s ``engine-state`` changelog, committed in transactions of ``chunk``."""

    ensure_topics(cfg.client_conf(), cfg.names, cfg.topic_settings)
    producer = Producer(cfg.producer_conf(**{"transactional.id": f"{cfg.topic_prefix}synthetic-{uuid.uuid4().hex[:6]}",
                                             "linger.ms": 20, "queue.buffering.max.messages": 1_000_000}))
    producer.init_transactions(30)
    now = int(time.time() * 1000)
    for lo in range(0, n, chunk):
        producer.begin_transaction()
        for i in range(lo, min(n, lo + chunk)):
            iid = f"syn{tag}-{i}"
            producer.produce(cfg.names.engine_state, encode_engine_state(iid, synthetic_state(iid, i, now, timers)), iid.encode(),
                             partition=partition_for(iid, cfg.partitions))
            if i % 1000 == 0:
                producer.poll(0)
        producer.commit_transaction(60)


def restore_into(cfg: KafkaConfig, state_dir: str) -> tuple[int, float, EngineStore]:
    """Restore every partition of ``cfg``'s changelog into stores under ``state_dir``: (records, seconds, store)."""
    store = EngineStore(state_dir, 0)
    stores = [store.open(p, 0) for p in range(cfg.partitions)]
    t0 = time.monotonic()
    stats = restore_partitions(cfg.consumer_conf("kflow-restore"), cfg.names.engine_state, stores)
    return sum(s.records for s in stats.values()), time.monotonic() - t0, store


def run_restore_sizes(stack: _Stack, sizes: tuple[int, ...]) -> list[dict[str, float]]:
    out = []
    for n in sizes:
        cfg = stack.cfg.model_copy(update={"topic_prefix": f"{stack.prefix}r{n}."})
        write_states(cfg, n)
        records, seconds, store = restore_into(cfg, os.path.join(stack.root, f"restore-{n}"))
        store.close_all()
        out.append({"instances": n, "records": records, "seconds": round(seconds, 2),
                    "records_per_s": round(records / seconds if seconds else 0.0)})
    return out


def run_failover(bootstrap: Optional[str], partitions: int = 8, prefix: Optional[str] = None, rate: float = 100.0,
                 seconds: float = 20.0, sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000),
                 modes: tuple[str, ...] = ("takeover", "replacement"), json_out: Optional[str] = None,
                 standby: int = 0) -> dict[str, Any]:
    """All three measurements, each on fresh topics; prints a summary and returns it.

    With ``standby`` ≥ 1 only the takeover runs, with that many standby replicas on both engines
    (a replacement on a fresh state directory has no warm copy to promote)."""
    console = Console()
    if standby:
        modes, sizes = ("takeover",), ()
    report: dict[str, Any] = {"partitions": partitions, "rate": rate, "standby": standby}
    results: list[FailoverResult] = []
    for mode in modes:
        stack = _Stack(bootstrap, partitions, prefix and f"{prefix}{mode}.")
        try:
            console.print(f"failover: {mode}, chain3 at {rate:g}/s for {seconds:g}s, {partitions} partitions, "
                          f"kill half way" + (f", {standby} standby replica(s)" if standby else ""))
            results.append(run_takeover(stack, rate, seconds, standby=standby) if mode == "takeover"
                           else run_replacement(stack, rate, seconds))
            if mode == "replacement" and sizes:
                console.print(f"failover: restore of {', '.join(f'{n:,}' for n in sizes)} instances")
                report["restore"] = run_restore_sizes(stack, sizes)
        finally:
            stack.close()
    for r in results:
        line = (f"{r.mode}: {r.in_flight} instances in flight; pause max {r.pause_max_s:.2f}s, p99 "
                f"{r.pause_p99_s:.2f}s, p50 {r.pause_p50_s:.2f}s; kill → owning all partitions "
                f"{r.kill_to_owning_s:.2f}s; unfinished {r.unfinished}")
        if "replacement_needed_after_s" in r.extra:
            line += (f"; the dead engine's open transaction held read_committed readers back until its "
                     f"identity was restarted {r.extra['replacement_needed_after_s']:.0f}s after the kill "
                     "(pauses are from record timestamps)")
        if r.mode.startswith("takeover"):
            line += f"; the survivor's restore read {r.extra.get('restored_records', 0):.0f} changelog records"
        if "promoted_partitions" in r.extra:
            line += (f"; promoted {r.extra['promoted_partitions']:.0f} standby partitions replaying "
                     f"{r.extra['replayed_records']:.0f} records (at most {r.extra['replayed_max_records']:.0f} "
                     f"per partition, {r.extra['promotion_max_s']:.2f}s)")
        if "restore_s" in r.extra:
            line += (f"; spawn → owning {r.extra['spawn_to_owning_s']:.2f}s → serving "
                     f"{r.extra['spawn_to_serving_s']:.2f}s; restore {r.extra['restore_s']:.2f}s")
        console.print(line)
    for row in report.get("restore", []):
        console.print(f"restore: {row['instances']:,} instances ({row['records']:,} records, {partitions} partitions) "
                      f"in {row['seconds']:.2f}s = {row['records_per_s']:,.0f} records/s")
    report["runs"] = [r.__dict__ for r in results]
    print(json.dumps(report))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(report, f, indent=2)
    return report
