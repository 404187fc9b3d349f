"""``kflow bench``: the chain3 workload (three sequential ``x -> x+1`` activities) on a real stack.

Two phases on a fresh topic prefix: *throughput* (``n`` instances, ``concurrency`` in flight, as
fast as the stack goes) and *latency* (instances started at a fixed ``rate`` per second, measuring
start-to-result latency when the stack is not saturated). Latency is measured client side, from
producing ``StartWorkflow`` to reading the terminal record on the ``state`` topic. The engine and
the worker run as separate processes, so their RSS is reported separately.

``--mix`` (:func:`run_mix`) overloads a deliberately slow worker instead: 20 % critical and 80 %
background chain3 instances started faster than it can finish them, with p50/p99 per level next
to the critical latency of an unloaded run.

``--auth`` (:func:`run_auth`) runs the same phases twice (``--rounds`` pairs, alternating which goes
first), each on a fresh embedded broker (or on fresh topic prefixes of the ``--bootstrap``
cluster): once with auth off, once with auth on for
every process (a generated HS256 secret, the bench principal's commands signed, its policy applied
to the ``policies`` topic before the run), and prints both side by side with the throughput loss,
the latency ratios and the CPU per workflow of every process in the throughput phase.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any, Optional

from confluent_kafka import Consumer, Producer
from pydantic import SecretStr
from rich.console import Console
from rich.table import Table

from kflow import _hops
from kflow.client import Client
from kflow.config import KafkaConfig
from kflow.dev.breakdown import HopRow, as_dicts, offsets_now, read_stamps
from kflow.dev.breakdown import breakdown as compute_breakdown
from kflow.dev.procs import KflowProcess
from kflow.dev.stack import DevStack, bundled_spec
from kflow.model.errors import KflowError, WorkflowNotDeployed
from kflow.model.messages import Command, Status
from kflow.readend import at_end
from kflow.schemas.codec import decode_state, encode_command
from kflow.security.principal import DEFAULT_TENANT, SYSTEM_ADMIN
from kflow.security.tokens import CommandSigner, Keys, issue

log = logging.getLogger("kflow.bench")

#: The module of chain3's activity, served by the bench worker (or, with ``--local``, by the engine).
BENCH_ACTIVITIES = "kflow.dev.bench_activities"


@dataclass
class PhaseResult:
    phase: str
    instances: int
    seconds: float
    completed_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    failed: int
    missed: int = 0  # started, but no terminal state record reached the driver (see Driver.run)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


class Driver:
    """Starts instances and times them to their terminal state record."""

    def __init__(self, cfg: KafkaConfig, workflow: str) -> None:
        self.cfg, self.workflow = cfg, workflow
        #: instance -> (client sent µs, engine stamp of the terminal state record, client seen µs)
        self.hops: dict[str, tuple[int, Optional[tuple[str, int, int]], int]] = {}
        self.sent_us: dict[str, int] = {}
        self.stamping = False  # ask every hop to stamp its records (kflow bench --breakdown)
        self.producer = Producer(cfg.producer_conf(**{"linger.ms": 1}))
        self.consumer = Consumer(cfg.consumer_conf(f"bench-{uuid.uuid4().hex[:6]}", **{"fetch.wait.max.ms": 5}))
        topic = cfg.names.state
        md = self.consumer.list_topics(topic, timeout=10)
        self.consumer.assign(at_end(self.consumer, topic, md.topics[topic].partitions, 10))
        self.started: dict[str, float] = {}
        self.latencies: list[float] = []
        self.failed = 0
        #: The priority level of the instance started with a value (``--mix``); None: normal.
        self.priority_of: Optional[Callable[[int], Optional[int]]] = None
        self.level_of: dict[str, int] = {}
        #: Signs every start as the bench principal (``--auth``); None: starts go unsigned.
        self.signer: Optional[CommandSigner] = None
        #: Per level: (latency ms, when it finished) of the instances of the current phase.
        self.by_level: dict[int, list[tuple[float, float]]] = {}

    def start(self, iid: str, value: int) -> None:
        data: dict[str, Any] = {"workflow": self.workflow, "version": None, "input": value}
        level = self.priority_of(value) if self.priority_of is not None else None
        if level is not None:
            data["priority"] = self.level_of[iid] = level
        cmd = Command("StartWorkflow", iid, data)
        self.started[iid] = time.perf_counter()
        headers = None
        if self.stamping:
            sent = self.sent_us[iid] = _hops.now_us()
            headers = [_hops.stamp("C", sent, sent)]
        key, record = iid.encode(), encode_command(cmd)
        if self.signer is not None:  # the engine verifies the token against exactly this key and value
            headers = [*(headers or ()), self.signer.header(key, record)]
        self.producer.produce(self.cfg.names.commands, record, key, headers=headers)
        self.producer.poll(0)

    def poll(self, timeout: float) -> int:
        done = 0
        for m in self.consumer.consume(1000, timeout):
            if m.error():
                continue
            iid = m.key().decode()
            t0 = self.started.get(iid)
            if t0 is None:
                continue
            rec = decode_state(m.value())
            if rec["status"] in Status.TERMINAL:
                now = time.perf_counter()
                self.latencies.append((now - t0) * 1000)
                self.by_level.setdefault(self.level_of.pop(iid, 3), []).append(((now - t0) * 1000, now))
                if self.stamping:
                    self.hops[iid] = (self.sent_us.pop(iid, 0), _hops.find(m.headers()), _hops.now_us())
                if rec["status"] != Status.COMPLETED or rec["result"] != int(iid.rsplit("-", 1)[1]) + 3:
                    self.failed += 1
                del self.started[iid]
                done += 1
        return done

    def run(self, phase: str, n: int, concurrency: int, rate: Optional[float], timeout: float) -> PhaseResult:
        self.latencies, self.failed, self.by_level = [], 0, {}
        tag = uuid.uuid4().hex[:6]
        sent = finished = 0
        t0 = last_progress = time.perf_counter()
        deadline = t0 + timeout
        while finished < n:
            now = time.perf_counter()
            if now > deadline:
                raise KflowError(f"bench phase '{phase}' timed out: {finished}/{n} finished in {timeout:.0f}s")
            if sent == n and now - last_progress > STALL_SECONDS:
                # A terminal record that never reaches the driver (seen once on the embedded broker,
                # while the topic held it) is reported as missed instead of hanging the bench.
                outstanding = [iid for iid in self.started if iid.startswith(f"b{tag}-")]
                log.warning("bench phase '%s': no terminal record seen for %d instance(s) in %.0fs: %s",
                            phase, len(outstanding), STALL_SECONDS, ", ".join(outstanding[:5]))
                break
            if rate:
                due = min(n, int((time.perf_counter() - t0) * rate) + 1)
                while sent < due:
                    self.start(f"b{tag}-{sent}", sent)
                    sent += 1
            else:
                while sent < n and sent - finished < concurrency:
                    self.start(f"b{tag}-{sent}", sent)
                    sent += 1
            self.producer.poll(0)
            done = self.poll(0.002)
            if done:
                finished += done
                last_progress = time.perf_counter()
        dt = (last_progress if finished < n else time.perf_counter()) - t0
        return PhaseResult(phase, n, round(dt, 3), round(finished / dt, 1), round(_pct(self.latencies, 0.50), 2),
                           round(_pct(self.latencies, 0.95), 2), round(_pct(self.latencies, 0.99), 2), self.failed,
                           n - finished)

    def close(self) -> None:
        self.producer.flush(5)
        self.consumer.close()


#: Seconds without a finished instance, once all are started, after which a phase stops waiting.
STALL_SECONDS = 20.0

#: In-flight counts of ``kflow bench --curve``.
CURVE_POINTS = (16, 64, 256, 1024)


def _wait_published(client: Any, workflow: str, timeout: float) -> None:
    """Wait until the engine has published its hosted code workflow on the definitions topic."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.require_deployed(workflow, None)
            return
        except WorkflowNotDeployed:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _breakdown_table(rows: list[HopRow]) -> Table:
    table = Table(title="where a chain3 workflow's time goes (latency phase, per hop)")
    for col in ("hop", "what", "count", "p50 ms", "p99 ms", "per workflow p50 ms"):
        table.add_column(col, justify="right" if col not in ("hop", "what") else "left")
    for r in rows:
        table.add_row(r.hop, r.what, str(r.count), f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}", f"{r.per_workflow_p50_ms:.2f}")
    return table


def run_bench(bootstrap: Optional[str], n: int = 2000, concurrency: int = 64, style: str = "spec",
              prefix: Optional[str] = None, rate: Optional[float] = None, latency_seconds: float = 10.0,
              partitions: int = 4, json_out: Optional[str] = None, breakdown: bool = False,
              curve: bool = False, local: bool = False, auth: bool = False, rounds: int = 1) -> dict[str, Any]:
    """Run the chain3 bench; with ``local`` its tasks are local activities run by the engine (no worker);
    with ``auth`` it runs ``rounds`` pairs, auth off and on, and compares them (:func:`run_auth`)."""
    if auth:
        return run_auth(bootstrap, n, concurrency, style, prefix, rate=rate, latency_seconds=latency_seconds,
                        partitions=partitions, json_out=json_out, breakdown=breakdown, curve=curve, local=local,
                        rounds=rounds)
    return _run_once(bootstrap, n, concurrency, style, prefix, rate, latency_seconds, partitions, json_out,
                     breakdown, curve, local)


def _run_once(bootstrap: Optional[str], n: int, concurrency: int, style: str, prefix: Optional[str],
              rate: Optional[float], latency_seconds: float, partitions: int, json_out: Optional[str],
              breakdown: bool, curve: bool, local: bool, security: Optional[BenchAuth] = None,
              env: Optional[dict[str, str]] = None, emit: bool = True) -> dict[str, Any]:
    """One chain3 bench on its own engine and worker processes (given ``env`` on top of this process's).

    The CPU of every process is reported per workflow, the stack's own embedded broker's (without
    ``bootstrap``) as ``broker``.

    With ``security`` every process runs with auth on, the bench's policy is applied before the run
    and the client signs every command as the bench principal. With ``emit`` false the report is
    returned but neither printed as JSON nor written to ``json_out`` (the caller does).
    """
    console = Console(stderr=True)
    if style not in ("spec", "code"):
        raise KflowError(f"--style must be 'spec' or 'code', not {style!r}")
    if local and (style != "spec" or breakdown):
        raise KflowError("--local runs the spec chain3 without workers: not with --style code or --breakdown")
    # The same workload either as a deployed spec or as a code workflow hosted by the engine.
    workflow = "bench.chain3" if style == "spec" else "bench.chain3code"
    spec_file = "chain3.yaml"
    if local:
        workflow, spec_file = "bench.chain3local", "chain3_local.yaml"
    prefix = prefix or f"bench{uuid.uuid4().hex[:6]}."
    stack = _BenchStack(bootstrap, prefix, [] if local else [BENCH_ACTIVITIES], partitions=partitions,
                        workflows="kflow.dev.bench_workflows" if style == "code" else "",
                        activities=BENCH_ACTIVITIES if local else "",
                        env={**(env or {}), **(security.env() if security is not None else {})})
    try:
        stack.start()
        stack.wait_for_topics()  # the engine creates them; the bench's clients never do
        console.print(f"bench: broker {stack.bootstrap}, topics {prefix}*, {partitions} partitions"
                      + (", auth on" if security is not None else ""))
        cfg = KafkaConfig(bootstrap=stack.bootstrap or "", topic_prefix=prefix, partitions=partitions, dev_tuning=True)
        if security is not None:
            security.apply_policy(cfg)  # before the first command, so no start waits for a grant
            cfg = security.config(cfg, security.token)
        with (Client(config=cfg) if security is not None else stack.client()) as client:
            if style == "spec":
                client.deploy(bundled_spec(spec_file))
            else:
                _wait_published(client, workflow, 60)
            warm = client.start(workflow, 0, id=f"warm-{uuid.uuid4().hex[:6]}")
            warm.result(timeout=120)  # the engine and the worker have joined their groups
        driver = Driver(cfg, workflow)
        if security is not None:
            driver.signer = cfg.command_signer()
        results = []
        hop_rows: list[HopRow] = []
        broker_pid = stack.broker.pid if stack.broker is not None else None
        cpu0 = _cpu_now(stack.procs, broker_pid)
        try:
            driver.run("warm-up", min(200, n), concurrency, None, 120)
            busy0 = _cpu_now(stack.procs, broker_pid)
            for c in (CURVE_POINTS if curve else (concurrency,)):
                count = max(n, 6 * c) if curve else n
                console.print(f"throughput phase: {count} instances, {c} in flight")
                results.append(driver.run("throughput" if not curve else f"throughput c={c}", count, c, None, 600))
            busy = _cpu_per_workflow(busy0, _cpu_now(stack.procs, broker_pid), sum(r.instances for r in results))
            stack.check_alive()
            lat_rate = rate or 50.0
            lat_n = max(10, int(lat_rate * latency_seconds))
            console.print(f"latency phase: {lat_n} instances at {lat_rate:g}/s"
                          + (" (hop stamps on)" if breakdown else ""))
            if breakdown:
                task_topic, cmd_topic = cfg.names.tasks("bench"), cfg.names.commands
                since = (offsets_now(cfg, task_topic), offsets_now(cfg, cmd_topic))
                driver.stamping = True
            results.append(driver.run(f"latency@{lat_rate:g}/s", lat_n, 10**9, lat_rate, 600))
            if breakdown:
                keys = set(driver.hops)
                hop_rows = compute_breakdown(driver.hops, read_stamps(cfg, task_topic, since[0], keys),
                                             read_stamps(cfg, cmd_topic, since[1], keys))
        finally:
            driver.close()
        rss = {p.args[0]: round(p.rss_mb(), 1) for p in stack.procs}
        # CPU per workflow of every process over the timed phases and the warm-up (less noisy than wall time)
        timed = min(200, n) + sum(r.instances for r in results)
        cpu_ms = _cpu_per_workflow(cpu0, _cpu_now(stack.procs, broker_pid), timed)
        per_workflow = 1 if local else 4  # Kafka commands decided: the start, plus three results from a worker
        report = {"bench": "chain3", "style": style, "local": local, "auth": security is not None,
                  "partitions": partitions, "cpus": os.cpu_count(),
                  "phases": [asdict(r) for r in results], "rss_mb": rss, "cpu_ms_per_workflow": cpu_ms,
                  "throughput_cpu_ms_per_workflow": busy,
                  "engine_commands_per_s": round(max(r.completed_per_s for r in results[:-1]) * per_workflow, 1)}
        if hop_rows:
            report["breakdown"] = as_dicts(hop_rows)
        table = Table(title=f"kflow bench · chain3 (3 sequential {'local ' if local else ''}activities per workflow)"
                      + (" · auth on" if security is not None else ""))
        for col in ("phase", "instances", "completed/s", "p50 ms", "p95 ms", "p99 ms", "failed", "missed"):
            table.add_column(col, justify="right")
        for r in results:
            table.add_row(r.phase, str(r.instances), f"{r.completed_per_s:,.0f}", f"{r.p50_ms:.1f}",
                          f"{r.p95_ms:.1f}", f"{r.p99_ms:.1f}", str(r.failed), str(r.missed))
        Console().print(table)
        if hop_rows:
            Console().print(_breakdown_table(hop_rows))
        Console().print(f"RSS: {', '.join(f'{k} {v:.0f} MiB' for k, v in rss.items())}; "
                        f"engine commands/s ({per_workflow} per workflow): {report['engine_commands_per_s']:,.0f}; "
                        f"CPU per workflow: {', '.join(f'{k} {v:.2f} ms' for k, v in cpu_ms.items())}; "
                        f"in the throughput phase{'s' if curve else ''}: "
                        f"{', '.join(f'{k} {v:.2f} ms' for k, v in busy.items())}")
        if emit:
            print(json.dumps(report))
            if json_out:
                with open(json_out, "w") as f:
                    json.dump(report, f, indent=2)
        return report
    finally:
        stack.stop()


#: The principal ``kflow bench --auth`` starts its workflows as, and the role its policy binds it to.
AUTH_PRINCIPAL = AUTH_ROLE = "bench"
#: ``kflow bench --auth``'s policy: the bench principal may deploy and start workflows (it owns the
#: instances it starts, so everything else on them is allowed by ownership, checked per command).
AUTH_POLICY: dict[str, Any] = {"roles": {AUTH_ROLE: ["definition:Create", "definition:Execute", "instance:View"]},
                               "bindings": {DEFAULT_TENANT: {AUTH_PRINCIPAL: [AUTH_ROLE]}}}
#: Lifetime of the tokens ``kflow bench --auth`` mints: longer than any bench.
AUTH_TOKEN_TTL_S = 24 * 3600


@dataclass(frozen=True)
class BenchAuth:
    """The keys and tokens of a ``kflow bench --auth`` run, made fresh for it.

    Attributes:
        secret: The HS256 secret every process of the run gets as ``KFLOW_JWT_SECRET``.
        token: The bench principal's token: the client signs every command with it.
        admin_token: A ``system_admin`` token that signs only the policy record.
    """

    secret: str = field(repr=False)
    token: str = field(repr=False)
    admin_token: str = field(repr=False)

    @classmethod
    def generate(cls) -> BenchAuth:
        secret = secrets.token_hex(32)
        keys = Keys(secret=secret.encode())
        return cls(secret, issue(AUTH_PRINCIPAL, DEFAULT_TENANT, [AUTH_ROLE], AUTH_TOKEN_TTL_S, keys),
                   issue("bench-admin", DEFAULT_TENANT, [SYSTEM_ADMIN], AUTH_TOKEN_TTL_S, keys))

    def env(self) -> dict[str, str]:
        """What the engine and worker processes get: auth on, with this run's secret."""
        return {"KFLOW_AUTH": "on", "KFLOW_JWT_SECRET": self.secret}

    def config(self, cfg: KafkaConfig, token: str) -> KafkaConfig:
        """``cfg`` with auth on, signing as ``token``'s principal."""
        return KafkaConfig(bootstrap=cfg.bootstrap, topic_prefix=cfg.topic_prefix, partitions=cfg.partitions,
                           dev_tuning=cfg.dev_tuning, auth=True, jwt_secret=SecretStr(self.secret),
                           token=SecretStr(token))

    def apply_policy(self, cfg: KafkaConfig, timeout: float = 60.0) -> int:
        """Apply :data:`AUTH_POLICY` to the ``policies`` topic of ``cfg``'s prefix as the admin; its offset."""
        from kflow.security.policy import parse_policy
        from kflow.streams.policies import publish_policy

        return publish_policy(self.config(cfg, self.admin_token), parse_policy(AUTH_POLICY, "kflow bench --auth"),
                              "kflow bench --auth", timeout)


class _BenchStack(DevStack):
    """A :class:`DevStack` whose engine and worker get :attr:`env` on top of this process's environment."""

    def __init__(self, *args: Any, env: Optional[dict[str, str]] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.env = env or {}

    def spawn(self, proc: KflowProcess, name: str) -> None:
        proc.env.update(self.env)
        super().spawn(proc, name)


def _cpu_now(procs: list[KflowProcess], broker_pid: Optional[int] = None) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each process, by this one (the driver) and by the
    embedded broker when its pid is given; Linux ``/proc``."""
    out = {"driver": sum(os.times()[:2])}
    pids = [(p.args[0], p.pid) for p in procs] + ([("broker", broker_pid)] if broker_pid is not None else [])
    tick = os.sysconf("SC_CLK_TCK")
    for name, pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
            out[name] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return out


def _cpu_per_workflow(before: dict[str, float], after: dict[str, float], workflows: int) -> dict[str, float]:
    """CPU ms per workflow of each process between two :func:`_cpu_now` readings, and their ``total``."""
    out = {k: round((v - before.get(k, 0.0)) * 1000 / max(workflows, 1), 3) for k, v in after.items()}
    out["total"] = round(sum(out.values()), 3)
    return out


def _ratio(on: float, off: float) -> Optional[float]:
    return round(on / off, 3) if off else None


def compare_phases(off: list[dict[str, Any]], on: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per phase, auth off against on: completed/s, the throughput loss in %, and the p50/p99 ratios (on / off)."""
    rows = []
    for a, b in zip(off, on, strict=True):
        loss = round((1 - b["completed_per_s"] / a["completed_per_s"]) * 100, 1) if a["completed_per_s"] else None
        rows.append({"phase": a["phase"], "off_per_s": a["completed_per_s"], "on_per_s": b["completed_per_s"],
                     "throughput_loss_pct": loss, "off_p50_ms": a["p50_ms"], "on_p50_ms": b["p50_ms"],
                     "p50_ratio": _ratio(b["p50_ms"], a["p50_ms"]), "off_p99_ms": a["p99_ms"], "on_p99_ms": b["p99_ms"],
                     "p99_ratio": _ratio(b["p99_ms"], a["p99_ms"]), "failed": [a["failed"], b["failed"]],
                     "missed": [a["missed"], b["missed"]]})
    return rows


def run_auth(bootstrap: Optional[str], n: int = 2000, concurrency: int = 64, style: str = "spec",
             prefix: Optional[str] = None, rate: Optional[float] = None, latency_seconds: float = 10.0,
             partitions: int = 4, json_out: Optional[str] = None, breakdown: bool = False, curve: bool = False,
             local: bool = False, rounds: int = 1) -> dict[str, Any]:
    """``kflow bench --auth``: the same phases with auth off and on; both side by side.

    Each run gets its own topic prefix and its own engine and worker processes, stopped before the
    next run starts, so the runs share no state. Without ``bootstrap`` each run also gets its own
    embedded broker (its CPU counts as the process ``broker``), started empty, so no run meets a
    broker another filled. With ``bootstrap`` all share that cluster.

    ``rounds`` pairs run in the order off on, on off, off on, … (each pair compared on its own), so a
    machine that slows or speeds up during the bench weighs on both sides alike; the summary is the
    median over the pairs. The report's ``off``/``on``/``comparison`` are the first pair's.
    """
    if curve or breakdown:
        raise KflowError("--auth compares the plain phases: not with --curve or --breakdown")
    if rounds < 1:
        raise KflowError(f"--rounds must be at least 1, not {rounds}")
    console = Console(stderr=True)
    base = prefix or f"bench{uuid.uuid4().hex[:6]}."
    security = BenchAuth.generate()
    pairs: list[dict[str, Any]] = []
    for r in range(rounds):
        order = ("off", "on") if r % 2 == 0 else ("on", "off")
        reports: dict[str, dict[str, Any]] = {}
        for label in order:
            console.print(f"[bold]round {r + 1} of {rounds}: auth {label}[/bold]")
            # an explicit off: a KFLOW_AUTH=on in the caller's environment must not leak into the baseline
            reports[label] = _run_once(bootstrap, n, concurrency, style, f"{base}r{r}auth{label}." if rounds > 1
                                       else f"{base}auth{label}.", rate, latency_seconds, partitions, None, False,
                                       False, local, security=security if label == "on" else None,
                                       env={"KFLOW_AUTH": "off"}, emit=False)
        pairs.append(_compare_pair(reports, f"round {r + 1} ({' → '.join(order)})" if rounds > 1 else "",
                                   "fresh topics on one cluster" if bootstrap else "a fresh embedded broker each"))
    first = pairs[0]
    report: dict[str, Any] = {"bench": "chain3-auth", "off": first["off"], "on": first["on"],
                              "comparison": first["comparison"], "throughput_cpu_cost_pct": first["cpu_cost_pct"]}
    if rounds > 1:
        report["rounds"] = [{"order": p["title"], "comparison": p["comparison"], "cpu_cost_pct": p["cpu_cost_pct"]}
                            for p in pairs]
        report["median"] = _median_of_pairs(pairs)
        m = report["median"]
        Console().print(f"[bold]Median of {rounds} rounds[/bold]: throughput loss {_percent(m['throughput_loss_pct'])}, "
                        f"latency p50 × {_times(m['latency_p50_ratio'])}, p99 × {_times(m['latency_p99_ratio'])}, "
                        f"CPU cost of auth in the throughput phase {_percent(m['throughput_cpu_cost_pct'], signed=True)} "
                        f"(per round: {', '.join(_percent(p['comparison'][0]['throughput_loss_pct']) for p in pairs)})")
    print(json.dumps(report))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(report, f, indent=2)
    return report


def _compare_pair(reports: dict[str, dict[str, Any]], title: str, where: str) -> dict[str, Any]:
    """Print one off/on pair side by side; return its comparison and CPU cost."""
    rows = compare_phases(reports["off"]["phases"], reports["on"]["phases"])
    table = Table(title=f"kflow bench --auth · chain3, auth off → on ({where}){' · ' + title if title else ''}")
    for col in ("phase", "completed/s", "loss", "p50 ms", "p50 ×", "p99 ms", "p99 ×", "failed+missed"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["phase"], f"{r['off_per_s']:,.0f} → {r['on_per_s']:,.0f}", _percent(r["throughput_loss_pct"]),
                      f"{r['off_p50_ms']:.1f} → {r['on_p50_ms']:.1f}", _times(r["p50_ratio"]),
                      f"{r['off_p99_ms']:.1f} → {r['on_p99_ms']:.1f}", _times(r["p99_ratio"]),
                      " → ".join(str(f + m) for f, m in zip(r["failed"], r["missed"], strict=True)))
    Console().print(table)
    for heading, name in (("CPU per workflow", "cpu_ms_per_workflow"),
                          ("CPU per workflow in the throughput phase", "throughput_cpu_ms_per_workflow")):
        cpu_off, cpu_on = reports["off"][name], reports["on"][name]
        Console().print(f"{heading}, off → on: " + ", ".join(
            f"{k} {cpu_off[k]:.2f} → {cpu_on[k]:.2f} ms" for k in cpu_off if k in cpu_on))
    # every process shares the machine's cores: at saturation the CPU a workflow costs them all bounds
    # the throughput, and it depends less on other work on the machine than wall time does
    busy_off, busy_on = (reports[k]["throughput_cpu_ms_per_workflow"]["total"] for k in ("off", "on"))
    cpu_cost = round((busy_on / busy_off - 1) * 100, 1) if busy_off else None
    Console().print(f"CPU cost of auth in the throughput phase (all processes): {_percent(cpu_cost, signed=True)}")
    return {"title": title, "off": reports["off"], "on": reports["on"], "comparison": rows, "cpu_cost_pct": cpu_cost}


def _median_of_pairs(pairs: list[dict[str, Any]]) -> dict[str, Optional[float]]:
    """Per figure, the median over the rounds (None where a round had no figure)."""
    def median(values: list[Optional[float]]) -> Optional[float]:
        got = sorted(v for v in values if v is not None)
        if not got:
            return None
        mid = len(got) // 2
        return round(got[mid] if len(got) % 2 else (got[mid - 1] + got[mid]) / 2, 3)
    thr = [p["comparison"][0] for p in pairs]
    lat = [p["comparison"][-1] for p in pairs]
    return {"throughput_loss_pct": median([r["throughput_loss_pct"] for r in thr]),
            "latency_p50_ratio": median([r["p50_ratio"] for r in lat]),
            "latency_p99_ratio": median([r["p99_ratio"] for r in lat]),
            "throughput_cpu_cost_pct": median([p["cpu_cost_pct"] for p in pairs])}


def _percent(value: Optional[float], signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.1f} %" if signed else f"{value:.1f} %"


def _times(ratio: Optional[float]) -> str:
    return "—" if ratio is None else f"{ratio:.2f}"


#: The workflow of ``kflow bench --mix``: chain3 on the slow activity of the mix worker.
MIX_WORKFLOW: dict[str, Any] = {"name": "bench.mix", "version": 1, "steps": [
    {"id": "a", "task": "bench.slow_inc", "queue": "benchmix", "input": "input", "output": "a"},
    {"id": "b", "task": "bench.slow_inc", "queue": "benchmix", "input": "a", "output": "b"},
    {"id": "c", "task": "bench.slow_inc", "queue": "benchmix", "input": "b", "output": "c"},
    {"id": "done", "succeed": "c"}]}
MIX_ACTIVITIES = "kflow.dev.bench_mix_activities"
MIX_SLOTS = 2  # the mix worker's concurrency: with 20 ms tasks, 100 tasks/s, about 33 chain3/s
CRITICAL, BACKGROUND = 1, 5


def mix_level(value: int) -> int:
    """Every fifth instance of the mix is critical, the others background (20 % / 80 %)."""
    return CRITICAL if value % 5 == 0 else BACKGROUND


@dataclass
class LevelResult:
    phase: str
    level: str
    instances: int
    p50_ms: float
    p99_ms: float
    longest_gap_s: float  # most time between two consecutive completions of the level


def _level_results(phase: str, by_level: dict[int, list[tuple[float, float]]]) -> list[LevelResult]:
    out = []
    for level, name in ((CRITICAL, "critical"), (BACKGROUND, "background")):
        rows = by_level.get(level, [])
        done = sorted(t for _, t in rows)
        gap = max((b - a for a, b in pairwise(done)), default=0.0)
        lat = [ms for ms, _ in rows]
        out.append(LevelResult(phase, name, len(rows), round(_pct(lat, 0.5), 1), round(_pct(lat, 0.99), 1),
                               round(gap, 2)))
    return out


def run_mix(bootstrap: Optional[str], n: int = 2000, prefix: Optional[str] = None, rate: Optional[float] = None,
            partitions: int = 4, json_out: Optional[str] = None) -> dict[str, Any]:
    """``kflow bench --mix``: chain3 overload, 20 % critical and 80 % background, p50/p99 per level.

    A worker with :data:`MIX_SLOTS` slots runs the 20 ms activity of
    :mod:`kflow.dev.bench_mix_activities`, so its capacity is known: ``capacity`` chain3 per
    second. First *unloaded*: critical instances only at a third of it; then *mix*: ``n``
    instances started at ``rate`` (default 1.5 × capacity), every fifth critical. Critical p99
    should stay near the unloaded one while background absorbs the delay and keeps finishing
    (its longest gap between two completions is printed).
    """
    from kflow.dev.bench_mix_activities import WORK_MS
    from kflow.dev.procs import worker_process

    console = Console(stderr=True)
    capacity = MIX_SLOTS * 1000 / WORK_MS / 3
    rate = rate or round(1.5 * capacity, 1)
    prefix = prefix or f"benchmix{uuid.uuid4().hex[:6]}."
    stack = DevStack(bootstrap, prefix, [], partitions=partitions)
    try:
        stack.start()
        assert stack.bootstrap is not None
        stack.spawn(worker_process(stack.bootstrap, prefix, [MIX_ACTIVITIES], partitions=stack.partitions,
                                   concurrency=MIX_SLOTS), "worker")
        stack.wait_for_topics()
        console.print(f"bench --mix: broker {stack.bootstrap}, topics {prefix}*, worker {MIX_SLOTS} slots × "
                      f"{WORK_MS} ms tasks (~{capacity:.0f} chain3/s)")
        cfg = KafkaConfig(bootstrap=stack.bootstrap, topic_prefix=prefix, partitions=stack.partitions, dev_tuning=True)
        with stack.client() as client:
            client.deploy(MIX_WORKFLOW)
            client.start("bench.mix", 0, id=f"warm-{uuid.uuid4().hex[:6]}", priority="critical").result(timeout=120)
        driver = Driver(cfg, "bench.mix")
        try:
            driver.priority_of = mix_level  # both levels' topics are fetched before anything is timed
            driver.run("warm-up", 10, 10**9, capacity / 3, 120)
            driver.priority_of = lambda value: CRITICAL
            quiet_n = max(5, n // 10)
            console.print(f"unloaded phase: {quiet_n} critical instances at {capacity / 3:.1f}/s")
            quiet = driver.run("unloaded", quiet_n, 10**9, capacity / 3, 600)
            levels = _level_results("unloaded", driver.by_level)[:1]
            stack.check_alive()
            driver.priority_of = mix_level
            console.print(f"mix phase: {n} instances at {rate:g}/s (20 % critical, 80 % background)")
            mixed = driver.run(f"mix@{rate:g}/s", n, 10**9, rate, 3600)
            levels += _level_results(mixed.phase, driver.by_level)
        finally:
            driver.close()
        report = {"bench": "chain3-mix", "capacity_per_s": round(capacity, 1), "rate": rate,
                  "phases": [asdict(quiet), asdict(mixed)], "levels": [asdict(r) for r in levels]}
        table = Table(title=f"kflow bench --mix · chain3 at {rate:g}/s on a worker for ~{capacity:.0f}/s")
        for col in ("phase", "level", "instances", "p50 ms", "p99 ms", "longest gap s"):
            table.add_column(col, justify="right")
        for r in levels:
            table.add_row(r.phase, r.level, str(r.instances), f"{r.p50_ms:.1f}", f"{r.p99_ms:.1f}",
                          f"{r.longest_gap_s:.2f}")
        Console().print(table)
        print(json.dumps(report))
        if json_out:
            with open(json_out, "w") as f:
                json.dump(report, f, indent=2)
        return report
    finally:
        stack.stop()
