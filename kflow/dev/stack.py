"""``kflow dev``: the whole system on one machine — embedded broker, engine, workers — and the demo.

Without ``--bootstrap`` it starts the embedded Tansu broker (on ``--port`` or a free port); it then
runs the engine, one worker process for the ``--worker-module`` modules and one for the
``--connectors`` file, prints where everything is, and runs until Ctrl-C. While it runs,
``.kflow/dev.json`` in the current folder says how to reach it (bootstrap, prefix, partitions), so
other ``kflow`` commands started there use the stack; the file is removed on exit. State and
logs live under one temporary folder, removed on exit unless ``--keep`` is given or the stack
failed (then its path is printed). ``--demo`` runs the bundled order workflow end to end on that
stack, shows progress, prints the results and exits 0 (non-zero if any demo instance did not
complete as expected).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import orjson
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kflow.client import Client
from kflow.config import DEV_FILE, DevStackFile, KafkaConfig, existing_partitions
from kflow.dev.broker import EmbeddedBroker
from kflow.dev.procs import KflowProcess, engine_process, worker_process
from kflow.model.errors import KflowError
from kflow.model.messages import Status

log = logging.getLogger("kflow.dev")
DEMO_MODULES = ["kflow.dev.demo_activities"]
DEMOS = ("order", "iot")


def bundled_spec(name: str) -> dict[str, Any]:
    """A YAML definition shipped inside ``kflow/dev``."""
    return yaml.safe_load(resources.files("kflow.dev").joinpath(name).read_text())


class DevStack:
    """Broker (embedded unless given), one engine process and worker processes.

    Args:
        bootstrap: An existing cluster to use; None starts the embedded broker (on ``port``).
        prefix: Topic prefix (default ``KFLOW_TOPIC_PREFIX`` or ``kflow.``).
        worker_modules: Activity modules served by one worker process.
        workflows: Comma-separated code-workflow modules the engine hosts.
        activities: Comma-separated modules of the local activities the engine runs itself.
        partitions: Partition count of the topics it creates; topics that already exist on a
            given cluster keep theirs.
        state_dir: Where the engine keeps its state; default a folder in the stack's temporary root.
        port: Port of the embedded broker.
        connectors: A connectors file served by its own worker process.
        announce: Write :data:`~kflow.config.DEV_FILE` in the current folder while running.
        keep: Keep the temporary root on :meth:`stop` (it is also kept when the stack failed).
    """

    def __init__(self, bootstrap: Optional[str], prefix: Optional[str], worker_modules: list[str],
                 workflows: str = "", partitions: int = 4, state_dir: Optional[str] = None, *,
                 port: Optional[int] = None, connectors: Optional[str] = None, announce: bool = False,
                 keep: bool = False, activities: str = "") -> None:
        self.broker: Optional[EmbeddedBroker] = None
        self.activities = activities
        self.bootstrap = bootstrap
        self.prefix = prefix or os.environ.get("KFLOW_TOPIC_PREFIX") or "kflow."
        self.worker_modules = worker_modules
        self.workflows = workflows
        self.partitions = partitions
        self.port = port
        self.connectors = connectors
        self.announce = announce
        self.keep = keep
        self.failed = False
        """Set by the caller when the stack failed: :meth:`stop` then keeps the temporary root."""
        self.root = Path(tempfile.mkdtemp(prefix="kflow-dev-"))
        self.state_dir = state_dir or str(self.root / "state")
        self.procs: list[KflowProcess] = []
        self.triggers: Any = None
        self.visibility: Any = None
        self.dev_file: Optional[DevStackFile] = None

    def start(self) -> DevStack:
        if self.bootstrap is None:
            self.broker = EmbeddedBroker(self.root / "broker")
            self.bootstrap = self.broker.start(port=self.port)
        else:
            # a cluster that already has these topics decides the partition count
            self.partitions = existing_partitions(KafkaConfig(bootstrap=self.bootstrap, topic_prefix=self.prefix)) \
                or self.partitions
        assert self.bootstrap is not None
        eng = engine_process(self.bootstrap, self.prefix, os.path.join(self.state_dir, "engine"),
                             partitions=self.partitions, workflows=self.workflows, activities=self.activities)
        self.spawn(eng, "engine")
        if self.worker_modules:
            self.spawn(worker_process(self.bootstrap, self.prefix, self.worker_modules,
                                      partitions=self.partitions), "worker")
        if self.connectors:
            self.spawn(worker_process(self.bootstrap, self.prefix, [], partitions=self.partitions,
                                      connectors=self.connectors), "connectors")
        if self.announce:
            self.dev_file = DevStackFile(self.bootstrap, self.prefix, self.partitions, os.getpid(),
                                         Path.cwd() / DEV_FILE)
            self.dev_file.write()
        return self

    def wait_for_topics(self, timeout: float = 60.0) -> None:
        """Wait until the engine has created kflow's topics: clients never create them, and the demo
        (or a ``kflow start`` in this folder) would otherwise race the engine's start-up."""
        from confluent_kafka.admin import AdminClient

        from kflow.streams.topics import TopicNames

        names = TopicNames(self.prefix)
        needed = {names.commands, names.events, names.state, names.engine_state, names.definitions}
        admin = AdminClient({"bootstrap.servers": self.bootstrap or ""})
        deadline = time.monotonic() + timeout
        while not needed <= set(admin.list_topics(timeout=5).topics):
            self.check_alive()
            if time.monotonic() > deadline:
                raise KflowError(f"the engine did not create the topics in {timeout:.0f}s; engine log:\n"
                                 f"{self.procs[0].log_tail(2000)}")
            time.sleep(0.1)  # polls a condition with a deadline

    def spawn(self, proc: KflowProcess, name: str) -> None:
        """Start ``proc`` as part of the stack (stopped with it); its log goes to ``logs/<name>.log``."""
        (self.root / "logs").mkdir(exist_ok=True)
        proc.log_path = str(self.root / "logs" / f"{name}.log")
        self.procs.append(proc.start())

    def client(self) -> Client:
        return Client(self.bootstrap, config=KafkaConfig(bootstrap=self.bootstrap or "", topic_prefix=self.prefix,
                                                         partitions=self.partitions, dev_tuning=True))

    def start_triggers(self, triggers: list[Any]) -> None:
        """Run a trigger runner for ``triggers`` in this process; stopped by :meth:`stop`."""
        from kflow.config import TriggerConfig, load_config
        from kflow.connectors.triggers import TriggerRunner

        config = load_config(TriggerConfig, bootstrap=self.bootstrap, topic_prefix=self.prefix,
                             partitions=self.partitions, dev_tuning=True)
        self.triggers = TriggerRunner(triggers, config, mqtt_url=config.mqtt_url)
        self.triggers.start()

    def start_visibility(self) -> str:
        """Run the visibility projection, API and console in this process; returns the console URL.

        Listens on ``KFLOW_VISIBILITY_PORT`` (8088), or on a free port when that one is taken.

        Raises:
            ModuleNotFoundError: the ``visibility`` extra is not installed (the message says so).
        """
        from kflow.config import VisibilityConfig, load_config
        from kflow.visibility.server import VisibilityServer

        settings = {"bootstrap": self.bootstrap, "topic_prefix": self.prefix, "partitions": self.partitions,
                    "dev_tuning": True, "state_dir": os.path.join(self.state_dir, "visibility")}
        self.visibility = VisibilityServer(load_config(VisibilityConfig, **settings))
        try:
            self.visibility.start()
        except KflowError:
            self.visibility.close()
            self.visibility = VisibilityServer(load_config(VisibilityConfig, **settings, visibility_port=0))
            self.visibility.start()
        return f"{self.visibility.url}/"

    def check_alive(self) -> None:
        if self.triggers is not None and self.triggers.error is not None:
            raise KflowError(f"the trigger runner failed: {self.triggers.error}")
        for p in self.procs:
            if not p.alive():
                raise KflowError(f"'kflow {p.args[0]}' exited with code {p.proc.returncode if p.proc else '?'}:\n"
                                 f"{p.log_tail(2000)}")

    def stop(self) -> Optional[Path]:
        """Stop everything and remove the dev file; returns the temporary root if it was kept."""
        try:
            if self.visibility is not None:
                self.visibility.close()
            if self.triggers is not None:
                self.triggers.stop()
            for p in reversed(self.procs):
                p.stop()
            if self.broker is not None:
                self.broker.stop()
        finally:
            if self.dev_file is not None:
                self.dev_file.remove()
                self.dev_file = None
        if self.keep or self.failed:
            return self.root
        shutil.rmtree(self.root, ignore_errors=True)
        return None


def run_dev(bootstrap: Optional[str], worker_modules: list[str], demo: Optional[str], prefix: Optional[str],
            workflows: Optional[str] = None, triggers: Optional[str] = None, connectors: Optional[str] = None,
            port: Optional[int] = None, keep: bool = False) -> None:
    console = Console(stderr=True)
    trigger_list = None
    if triggers:
        from kflow.connectors.triggers import load_triggers

        trigger_list = load_triggers(triggers)  # a bad file fails before anything starts
    if connectors:
        from kflow.connectors.config import load_connectors

        load_connectors(connectors)  # likewise
    modules = list(worker_modules)
    if demo:
        if demo not in DEMOS:
            raise KflowError(f"unknown demo '{demo}'; available: {', '.join(DEMOS)}")
        if demo == "order":
            modules += [m for m in DEMO_MODULES if m not in modules]
        if demo == "iot":
            import kflow.connectors.simulator  # noqa: F401  (the mqtt extra: missing, fail before anything starts)
        prefix = prefix or f"demo{uuid.uuid4().hex[:6]}."
    stack = DevStack(bootstrap, prefix, modules, workflows or "", port=port, connectors=connectors, announce=True,
                     keep=keep)
    try:
        _run_stack(stack, console, demo, trigger_list)
    except BaseException as exc:
        stack.failed = not isinstance(exc, KeyboardInterrupt)
        raise
    finally:
        kept = stack.stop()
        if kept is not None:
            console.print(f"state and logs kept in {kept}")


def _run_stack(stack: DevStack, console: Console, demo: Optional[str], trigger_list: Optional[list[Any]]) -> None:
    stack.start()
    console.print(f"[bold]kflow dev[/] broker [cyan]{stack.bootstrap}[/] · topics [cyan]{stack.prefix}*[/] · "
                  f"{stack.partitions} partitions")
    console.print(f"  state and logs in {stack.root} ({'kept' if stack.keep else 'removed'} on exit)")
    if stack.dev_file is not None:
        console.print(f"  other kflow commands in this folder use this stack ({stack.dev_file.path})")
    for p in stack.procs:
        console.print(f"  {p.args[0]:<7} pid {p.pid:<7} log {p.log_path}")
    stack.wait_for_topics()
    try:
        console.print(f"  console [cyan]{stack.start_visibility()}[/] (API docs at /docs)")
    except ModuleNotFoundError as exc:  # without the visibility extra the stack runs, without its console
        if (exc.name or "").startswith("kflow"):
            raise
        console.print(f"  console not started: {escape(str(exc))}")
    if trigger_list:
        stack.start_triggers(trigger_list)
        console.print(f"  triggers {', '.join(t.name for t in trigger_list)} (in this process)")
    if demo == "iot":
        from kflow.dev.iot import run_iot_demo

        run_iot_demo(stack, console)
        return
    if demo:
        run_order_demo(stack, console)
        return
    console.print("running; press Ctrl-C to stop")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            stack.check_alive()
    except KeyboardInterrupt:
        console.print("stopping")


def run_order_demo(stack: DevStack, console: Console, count: int = 8) -> None:
    """Deploy the demo definitions, run ``count`` orders (one deliberately out of stock), print results."""
    with stack.client() as client:
        client.deploy(bundled_spec("demo_invoice.yaml"))
        client.deploy(bundled_spec("demo_order.yaml"))
        orders = [{"sku": f"SKU-{i}", "qty": 3 + i, "items": [f"item-{i}-{j}" for j in range(3)]} for i in range(count)]
        orders[-1]["qty"] = 500  # out of stock: takes the `reject` path
        handles = [client.start("demo.order", o, id=f"order-{i}-{uuid.uuid4().hex[:4]}") for i, o in enumerate(orders)]
        results: dict[str, Any] = {}
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress:
            bar = progress.add_task("orders", total=len(handles))
            approved: set[str] = set()
            deadline = time.monotonic() + 120
            while len(results) < len(handles):
                if time.monotonic() > deadline:
                    raise KflowError(f"demo did not finish in 120s; engine log:\n{stack.procs[0].log_tail(2000)}")
                stack.check_alive()
                for h in handles:
                    if h.id in results:
                        continue
                    st = client.status(h.id) or {}
                    if st.get("status") == "RUNNING" and h.id not in approved and _waiting_for_approval(st):
                        client.signal(h.id, "approval", {"by": "demo-operator"})
                        approved.add(h.id)
                    if st.get("status") in Status.TERMINAL:
                        results[h.id] = st
                        progress.advance(bar)
                time.sleep(0.2)  # a human-paced progress display, not synchronisation
        table = Table(title="demo.order results")
        for col in ("instance", "status", "result / error"):
            table.add_column(col)
        ok = True
        for h, o in zip(handles, orders, strict=True):
            st = results[h.id]
            expect_fail = o["qty"] > 100
            if st["status"] == "COMPLETED":
                detail = orjson.dumps(st.get("result"), option=orjson.OPT_SORT_KEYS).decode()
            else:
                detail = f"{st.get('error_type')}: {st.get('error_message')}"
            ok &= (st["status"] == "FAILED") if expect_fail else (st["status"] == "COMPLETED")
            table.add_row(h.id, st["status"], detail[:110])
        Console().print(table)
        if not ok:
            raise KflowError("demo finished with unexpected outcomes (see table)")
        console.print(f"[green]demo complete:[/] {count - 1} orders completed, 1 rejected as out of stock")


def _waiting_for_approval(st: dict[str, Any]) -> bool:
    threads = (st.get("internal") or {}).get("threads", {})
    return any((t.get("wait") or {}).get("name") == "approval" for t in threads.values())
