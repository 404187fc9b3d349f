"""The long-running commands: ``engine`` and ``worker``, plus the ``dev`` and ``bench`` entry points.

``engine`` and ``worker`` run in the foreground until SIGINT or SIGTERM, which set a stop event
so the processor finishes (or aborts) its open batch and leaves its consumer group cleanly; a
second signal stops at once. Each logs one ``ready: ...`` INFO line once it owns partitions (and
``/readyz`` answers 200 from then on). ``dev`` and ``bench`` only parse options and hand over to
``kflow.dev.stack`` and ``kflow.dev.bench``, imported when the command runs.
"""

from __future__ import annotations

import inspect
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Annotated, Any, Literal, Optional

import typer
from typer.core import TyperCommand

from kflow._cli.common import Bootstrap, Prefix, Verbose, fail, import_modules, setup_logging

__all__ = ["DevCommand", "bench", "dev", "engine", "import_modules", "log_when_ready", "parse_settings",
           "run_until_signalled", "start_telemetry", "worker"]

log = logging.getLogger("kflow.cli")

#: The demo ``kflow dev --demo`` runs when no name is given.
DEFAULT_DEMO = "order"


def log_when_ready(ready: Callable[[float], bool], describe: Callable[[], str], what: str) -> threading.Thread:
    """Log ``ready: <describe()>`` at INFO once ``ready(timeout)`` is true (a daemon thread).

    ``ready`` blocks up to its timeout and returns whether the process is ready; the thread ends
    with the process.
    """
    def watch() -> None:
        while not ready(1.0):
            pass
        log.info("ready: %s", describe())

    thread = threading.Thread(target=watch, name=f"kflow-{what}-ready", daemon=True)
    thread.start()
    return thread


def run_until_signalled(run: Callable[[threading.Event], None], what: str) -> None:
    """Call ``run(stop_event)``; SIGINT/SIGTERM set the event, a second signal interrupts at once."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        log.info("%s: %s received, stopping gracefully (again to stop at once)", what, signal.Signals(signum).name)
        stop.set()

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        run(stop)
    except KeyboardInterrupt:
        log.warning("%s: interrupted", what)
        raise typer.Exit(130) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    log.info("%s stopped", what)


MetricsPort = Annotated[
    Optional[int],
    typer.Option("--metrics-port", min=0, max=65535, envvar="KFLOW_METRICS_PORT", show_envvar=True, metavar="PORT",
                 help="Port of /metrics, /healthz and /readyz (default: engine 9464, worker 9465, connect 9466; 0 disables)."),
]
Setting = Annotated[
    Optional[list[str]],
    typer.Option("--set", metavar="NAME=VALUE",
                 help="Any setting of the configuration table by name (e.g. --set max_batch=1000); repeatable."),
]


def parse_settings(items: Optional[list[str]]) -> dict[str, str]:
    """``--set name=value`` options as config overrides (``KFLOW_`` prefix and case are optional)."""
    out = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--set expects NAME=VALUE, not {item!r}")
        out[name.strip().lower().removeprefix("kflow_")] = value
    return out


def start_telemetry(config: Any, kind: str, ready: Callable[[], bool]) -> Any:
    """Start span export (when configured) and the operations endpoint; returns the server or None."""
    from kflow import _tracing

    _tracing.configure(config.service_name or f"kflow-{kind}", config.otlp_endpoint)
    port = config.metrics_port_for(kind)
    if not port:
        return None
    from kflow._http import serve_operations

    return serve_operations(port, ready, bootstrap=config.bootstrap)


def _settings(bootstrap: str | None, prefix: str | None, **fields: Any) -> dict[str, Any]:
    """Config overrides: only options the user gave, so ``KFLOW_*`` variables fill the rest."""
    out = {k: v for k, v in fields.items() if v is not None}
    if bootstrap is not None:
        out["bootstrap"] = bootstrap
    if prefix is not None:
        out["topic_prefix"] = prefix
    return out


def engine(
    state_dir: Annotated[Optional[str], typer.Option("--state-dir", metavar="DIR", envvar="KFLOW_STATE_DIR",
                                                     help="Directory of the RocksDB state stores.")] = None,
    partitions: Annotated[Optional[int], typer.Option("--partitions", min=1, envvar="KFLOW_PARTITIONS",
                                                      help="Partition count of topics the engine creates.")] = None,
    workflows: Annotated[Optional[str], typer.Option("--workflows", metavar="MODS", envvar="KFLOW_WORKFLOWS",
                                                     help="Comma-separated modules of code workflows to host.")] = None,
    activities: Annotated[Optional[list[str]], typer.Option(
        "--activities", metavar="MODULE",
        help="Module whose @kflow.activity functions the engine runs itself as local activities (repeatable; "
             "default KFLOW_ACTIVITIES).")] = None,
    metrics_port: MetricsPort = None,
    settings: Setting = None,
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Run the engine processor until SIGINT or SIGTERM.

    Joins the engine consumer group on the commands topic, restores the state of its partitions
    from the state changelog, and then decides commands and fires timers, committing every batch
    in one Kafka transaction. Run several to scale out; stopping one hands its partitions over.

    With --activities, tasks marked local (``local: true``, ``ctx.local_activity``) run inside
    the engine and are recorded in the transaction that scheduled them.

    Example: kflow engine --bootstrap kafka:9092 --state-dir /var/lib/kflow --partitions 16
    """
    setup_logging(verbose)
    if workflows:
        import_modules([workflows])
    modules = ",".join(m.strip() for item in activities or () for m in item.split(",") if m.strip()) or None
    if modules:
        import_modules([modules])  # an import error is reported here, with its cause
    from kflow.config import EngineConfig, fit_to_cluster, load_config
    from kflow.streams.local import local_activities
    from kflow.streams.processor import EngineProcessor

    config = load_config(EngineConfig, **{**parse_settings(settings), **_settings(
        bootstrap, prefix, state_dir=state_dir, partitions=partitions, workflows=workflows, activities=modules,
        metrics_port=metrics_port)})
    if config.activities:
        found = local_activities(config.activities)  # duplicate names are reported before any consumer starts
        log.info("local activities: %d from %s", len(found), config.activities)
    config = fit_to_cluster(config)
    processor = EngineProcessor(config)
    server = start_telemetry(config, "engine", processor.ready.is_set)
    log_when_ready(processor.ready.wait, lambda: f"owns partitions {sorted(processor.store.partitions)} of "
                   f"{config.names.commands}", "engine")
    try:
        run_until_signalled(processor.run, "engine")
    finally:
        if server is not None:
            server.shutdown()


def worker(
    modules: Annotated[Optional[list[str]], typer.Option("--module", "-m", metavar="MODULE",
                                                         help="Module with @activity functions (repeatable).")] = None,
    connectors: Annotated[Optional[str], typer.Option("--connectors", metavar="FILE", envvar="KFLOW_CONNECTORS",
                                                      help="Connectors YAML file whose operations to serve too.")] = None,
    concurrency: Annotated[Optional[int], typer.Option("--concurrency", "-c", min=1, envvar="KFLOW_CONCURRENCY",
                                                       help="Activities run at once.")] = None,
    metrics_port: MetricsPort = None,
    settings: Setting = None,
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Run an activity worker for the activities in the given modules until SIGINT or SIGTERM.

    Imports every module, registers its @activity functions, and consumes the task topics of
    their queues in one consumer group per queue, reporting results back as commands. Run
    several to scale out.

    Example: kflow worker -m myapp.activities -m myapp.payments --concurrency 64
    """
    setup_logging(verbose)
    if not modules and not connectors:
        fail("give at least one --module, or --connectors FILE")
    loaded = import_modules(modules or [])
    from kflow.config import WorkerConfig, fit_to_cluster, load_config
    from kflow.worker import Worker

    config = load_config(WorkerConfig, **{**parse_settings(settings), **_settings(
        bootstrap, prefix, concurrency=concurrency, metrics_port=metrics_port)})
    if connectors:
        from kflow.connectors.config import load_connectors

        load_connectors(connectors)  # a bad connectors file is reported before any broker is asked
    config = fit_to_cluster(config)
    if connectors:
        from kflow._cli.connect import run_worker_with_connectors

        return run_worker_with_connectors(config, loaded, connectors)
    runner = Worker(config, loaded)
    server = start_telemetry(config, "worker", lambda: runner.wait_assigned(0))
    log_when_ready(runner.wait_assigned, lambda: describe_worker(runner), "worker")
    try:
        run_until_signalled(runner.run, "worker")
    finally:
        if server is not None:
            server.shutdown()


def describe_worker(runner: Any) -> str:
    """``consuming queues a, b (topics ...)`` for a worker's ready line."""
    queues = sorted(getattr(runner, "queues", []) or [])
    return f"consuming queues {', '.join(queues) or '(none)'} as group {getattr(runner, 'group_id', '?')}"


def _call(fn: Callable[..., Any], *args: Any, **optional: Any) -> Any:
    """Call ``fn``; options the user set are passed as keywords, which ``fn`` must accept."""
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {}
    for name, value in optional.items():
        if value is None:
            continue
        if not takes_any and name not in params:
            fail(f"--{name.replace('_', '-')} is not supported by {fn.__module__}.{fn.__name__}")
        kwargs[name] = value
    return fn(*args, **kwargs)


class DevCommand(TyperCommand):
    """``dev``'s ``--demo`` takes an optional value: a bare ``--demo`` means the default demo."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        out = list(args)
        for i, arg in enumerate(out):
            if arg == "--":
                break
            if arg == "--demo" and (i + 1 == len(out) or out[i + 1].startswith("-")):
                out[i] = f"--demo={DEFAULT_DEMO}"
        return super().parse_args(ctx, out)


def dev(
    worker_modules: Annotated[Optional[list[str]], typer.Option(
        "--worker-module", "-m", metavar="MODULE", help="Also run a worker for this module (repeatable).")] = None,
    workflows: Annotated[Optional[str], typer.Option("--workflows", metavar="MODS",
                                                     help="Comma-separated modules of code workflows.")] = None,
    demo: Annotated[Optional[str], typer.Option(
        "--demo", metavar="[NAME]",
        help=f"Deploy and run a bundled demo (default '{DEFAULT_DEMO}'; 'iot' for the device fleet rollout).")] = None,
    connectors: Annotated[Optional[str], typer.Option("--connectors", metavar="FILE",
                                                      help="Also run a worker serving the connectors of this file.")] = None,
    triggers: Annotated[Optional[str], typer.Option("--triggers", metavar="FILE",
                                                    help="Also run the triggers of this file.")] = None,
    port: Annotated[Optional[int], typer.Option("--port", min=1, max=65535, metavar="PORT",
                                                help="Port of the embedded broker on 127.0.0.1 (default: a free one).")] = None,
    keep: Annotated[bool, typer.Option("--keep", help="Keep the state and log folder on exit.")] = False,
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Run a complete local stack: a broker (unless --bootstrap), an engine and workers.

    Without --bootstrap an embedded in-memory Kafka-protocol broker is started (on --port, or a
    free port). The engine and the workers run as child processes and stop together on Ctrl-C.
    While it runs, .kflow/dev.json in the current folder says how to reach it, so `kflow worker`,
    `kflow start` and the other commands started in this folder use it. --demo deploys a bundled
    example workflow and starts an instance of it. State and logs are removed on exit unless
    --keep is given or the stack failed.

    Example: kflow dev --demo
    """
    setup_logging(verbose)
    if port is not None and bootstrap is not None:
        fail("--port is the port of the embedded broker; it cannot be combined with --bootstrap (or KFLOW_BOOTSTRAP)")
    from kflow.dev.stack import run_dev

    _call(run_dev, bootstrap, list(worker_modules or []), demo, prefix, workflows=workflows, triggers=triggers,
          connectors=connectors, port=port, keep=keep or None)


def bench(
    n: Annotated[int, typer.Option("-n", "--count", min=1, help="Workflow instances to run.")] = 2000,
    concurrency: Annotated[int, typer.Option("-c", "--concurrency", min=1, help="Instances in flight at once.")] = 64,
    style: Annotated[Literal["spec", "code"], typer.Option("--style", help="Spec (YAML) or code workflows.")] = "spec",
    rate: Annotated[Optional[float], typer.Option("--rate", min=0, metavar="R",
                                                  help="Start rate of the latency phase (default 50/s).")] = None,
    partitions: Annotated[int, typer.Option("--partitions", min=1, help="Partitions of the bench topics.")] = 4,
    json_out: Annotated[Optional[str], typer.Option("--json", metavar="FILE", help="Also write the report as JSON.")] = None,
    breakdown: Annotated[bool, typer.Option("--breakdown", help="Stamp the latency phase's records at every hop and print where the time goes.")] = False,
    curve: Annotated[bool, typer.Option("--curve", help="Run the throughput phase at 16, 64, 256 and 1,024 in flight instead of -c.")] = False,
    failover: Annotated[bool, typer.Option("--failover", help="Instead: SIGKILL engines under chain3 load and print the pauses, takeover and restore times.")] = False,
    standby: Annotated[int, typer.Option("--standby", min=0, metavar="N", help="With --failover: both engines keep N standby replicas (KFLOW_STANDBY_REPLICAS); runs the takeover only and also prints the records each promotion replayed.")] = 0,
    local: Annotated[bool, typer.Option("--local", help="Run chain3 with local activities: the engine runs them itself (--activities), one transaction per workflow.")] = False,
    mix: Annotated[bool, typer.Option("--mix", help="Instead: overload a slow worker with -n chain3 instances, 20 % critical and 80 % background, started at --rate (default 1.5 × its capacity); print p50/p99 per level.")] = False,
    auth: Annotated[bool, typer.Option("--auth", help="Run the phases with auth off and with auth on (signed commands, attempt tokens, policy checks), each on a fresh broker, and print them side by side with the throughput loss and p50/p99 ratios.")] = False,
    rounds: Annotated[int, typer.Option("--rounds", min=1, metavar="R", help="With --auth: R off/on pairs, alternating which runs first, each compared on its own, then the median over them (a noisy machine needs 3 or more).")] = 1,
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Measure the chain3 workload: three sequential trivial activities per workflow.

    Starts the dev stack (embedded broker unless --bootstrap), then runs two phases on fresh
    topics: throughput (N instances, at most -c in flight) and latency (instances started at a
    fixed --rate). Prints completed/s, p50/p95/p99 start-to-result latency and the RSS of the
    engine and worker processes.

    With --failover: two engines under chain3 load, one SIGKILLed (pause per in-flight
    instance, kill to takeover); one engine replaced on a fresh state directory (spawn to owning
    to serving, restore time); and restore times of 10,000 to 1,000,000 instances. With
    --failover --standby N: the takeover only, both engines keeping N standby replicas.

    With --breakdown: the latency phase's records carry hop stamps, and a table shows where a
    workflow's time goes (client → engine → worker → … → client). With --curve: the
    throughput phase runs at 16, 64, 256 and 1,024 in flight. With --local: chain3's three
    tasks are local activities run by the engine (no worker), one transaction per workflow.

    With --mix: dispatch by priority under overload. A worker with 2 slots runs 20 ms tasks
    (~33 chain3/s); an unloaded run of critical instances gives the baseline, then -n instances
    (every fifth critical, the rest background) start at --rate (default 1.5 × capacity). The
    table shows p50/p99 per level and the longest gap between two background completions:
    critical p99 should stay near the baseline while background absorbs the delay, never stopping.

    With --auth: the cost of security. The same phases run twice, each on a fresh broker (fresh
    topics with --bootstrap) with its own engine and worker: once with auth off, once with
    KFLOW_AUTH=on for every process (a generated HS256 secret, a policy for the bench principal
    applied to the policies topic first, every start signed, results returning their attempt
    tokens). Both tables print, then one side by side: completed/s off and on, the throughput loss
    in %, p50/p99 on ÷ off, and the CPU per workflow of every process. --rounds R runs R such
    pairs, alternating which goes first, and prints the median over them.

    Example: kflow bench -n 5000 -c 128 --rate 50 (add --breakdown or --curve); kflow bench --mix -n 600;
    kflow bench --auth -n 2000 -c 64 --rounds 3
    """
    setup_logging(verbose)
    if standby and not failover:
        raise ValueError("--standby N measures a takeover with standby replicas: use it with --failover")
    if rounds > 1 and not auth:
        raise ValueError("--rounds R repeats the --auth comparison: use it with --auth")
    if auth and (mix or failover or breakdown or curve):
        raise ValueError("--auth compares the plain throughput and latency phases with auth off and on: it cannot be "
                         "combined with --mix, --failover, --breakdown or --curve")
    if mix:
        if failover or local or breakdown or curve or style != "spec":
            raise ValueError("--mix runs its own spec workload: it cannot be combined with --failover, --local, "
                             "--breakdown, --curve or --style code")
        from kflow.dev.bench import run_mix

        return _call(run_mix, bootstrap, n, prefix, rate=rate, partitions=partitions, json_out=json_out)
    if failover:
        from kflow.dev.failover import run_failover

        return _call(run_failover, bootstrap, partitions=partitions, prefix=prefix, json_out=json_out,
                     standby=standby)
    from kflow.dev.bench import run_bench

    if local and (style != "spec" or breakdown):
        raise ValueError("--local runs the spec chain3 without workers: it cannot be combined with --style code "
                         "or --breakdown")
    _call(run_bench, bootstrap, n, concurrency, style, prefix, rate=rate, partitions=partitions, json_out=json_out,
          breakdown=breakdown, curve=curve, local=local or None, auth=auth or None, rounds=rounds if rounds > 1 else None)
