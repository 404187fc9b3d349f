"""Run declared connectors on one dedicated event loop and serve their operations as activities.

:class:`ConnectorHost` builds every connector from its :class:`ConnectorSpec` (validating every
operation up front), runs them on one asyncio event loop in a daemon thread, and supervises each:

```
  built ──start()──► connecting ──ok──► up ──health() false or raises──► connecting
                        │  ▲                          (reconnect with backoff)
                        └──┘ failed: wait 0.5 s·2^n (± jitter, at most 30 s), try again
  any ──stop()──► disconnected
```

A failed connection never stops the process; until a connector is up its operations fail with a
retryable :class:`ConnectorUnavailable`. ``kflow_connector_up{connector,type}`` is 1 while a
connector is up. :meth:`ConnectorHost.activities` returns ``{queue: {"<connector>.<operation>":
async fn}}`` for a :class:`~kflow.worker.Worker`; each function runs the operation on the
connector loop and awaits it from the worker's loop, so neither blocks the other.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from prometheus_client import Gauge

from kflow.connectors.base import (
    Connector,
    ConnectorConfigError,
    ConnectorError,
    ConnectorSpec,
    Operation,
    connector_types,
    unknown_type,
)
from kflow.connectors.config import load_connectors, scrub
from kflow.model.errors import KflowError, NonRetryableError

__all__ = ["ConnectorHost", "ConnectorUnavailable"]

log = logging.getLogger("kflow.connectors")

CONNECTOR_UP = Gauge("kflow_connector_up", "1 while the connector is connected and healthy, else 0.",
                     ["connector", "type"])


def _one_line(text: str) -> str:
    return " ".join(text.split())[:500]


class ConnectorUnavailable(ConnectorError):
    """The connector is not connected (yet, or any more); the attempt may be retried."""

    def __init__(self, connector: str, detail: str = "") -> None:
        self.connector = connector
        super().__init__("ConnectorUnavailable",
                         f"connector '{connector}' is not connected" + (f": {detail}" if detail else ""),
                         retryable=True)


class _Slot:
    """One connector and its supervision state (touched only on the connector loop, except ``up``)."""

    def __init__(self, connector: Connector, operations: dict[str, Operation]) -> None:
        self.connector = connector
        self.operations = operations
        self.connected = False
        self.up = False
        self.last_error = ""
        self.task: asyncio.Task[None] | None = None


class ConnectorHost:
    """Connectors on a dedicated event loop thread, their health, and their operations as activities.

    Example:
        >>> host = ConnectorHost.from_file("connectors.yaml")  # doctest: +SKIP
        >>> host.start()                                        # doctest: +SKIP
        >>> Worker(WorkerConfig(), host.activities(my_module)).run()  # doctest: +SKIP
        >>> host.stop()                                         # doctest: +SKIP

    Args:
        specs: Connector declarations (see :func:`~kflow.connectors.config.load_connectors`).
        health_interval: Seconds between health checks of a connected connector.
        backoff_initial: First wait (seconds) after a failed connection attempt; it doubles per
            failure (± 20 % jitter) up to ``backoff_max``.
        backoff_max: Longest wait between connection attempts.
        operation_timeout: Most seconds a ``connect``, ``health`` or ``disconnect`` call may take.

    Raises:
        ConnectorConfigError: listing every problem: an unknown type, a duplicate name, an
            invalid setting or operation of any connector.
    """

    def __init__(
        self,
        specs: Iterable[ConnectorSpec],
        *,
        health_interval: float = 10.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        operation_timeout: float = 30.0,
    ) -> None:
        self.health_interval = health_interval
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.operation_timeout = operation_timeout
        known = connector_types()
        problems: list[str] = []
        self._slots: dict[str, _Slot] = {}
        for spec in specs:
            if spec.name in self._slots:
                problems.append(f"duplicate connector name '{spec.name}'")
                continue
            cls = known.get(spec.type)
            if cls is None:
                problems.append(unknown_type(spec.name, spec.type, known))
                continue
            try:
                connector = cls(spec)
                ops = connector.operations()
            except ConnectorConfigError as e:
                problems.append(scrub(str(e), spec))
                continue
            if not ops:
                problems.append(f"connector '{spec.name}': declares no operations")
                continue
            self._slots[spec.name] = _Slot(connector, ops)
            CONNECTOR_UP.labels(spec.name, spec.type).set(0)
        if problems:
            raise ConnectorConfigError("; ".join(problems))
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._stopping = False

    @classmethod
    def from_file(cls, path_or_text: str | Path, **kw: Any) -> ConnectorHost:
        """Build a host from a connectors YAML file (or its text)."""
        return cls(load_connectors(path_or_text), **kw)

    @property
    def connectors(self) -> dict[str, Connector]:
        """Connector name -> connector."""
        return {name: s.connector for name, s in self._slots.items()}

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The connectors' event loop (running once :meth:`start` was called)."""
        return self._loop

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, wait: float | None = None) -> bool:
        """Start the loop thread and connect every connector in the background.

        Args:
            wait: If given, wait up to this many seconds for every connector to be up.

        Returns:
            True if every connector is up (always True-or-not-waited when ``wait`` is None).
        """
        if self._thread is not None:
            raise KflowError("this ConnectorHost was already started")
        self._thread = threading.Thread(target=self._loop.run_forever, name="kflow-connectors", daemon=True)
        self._thread.start()
        for slot in self._slots.values():
            asyncio.run_coroutine_threadsafe(self._spawn(slot), self._loop).result(5)
        if wait is None:
            return all(self.healthy().values())
        return self.wait_up(wait)

    def wait_up(self, timeout: float) -> bool:
        """Wait until every connector is up; False after ``timeout`` seconds."""
        done = threading.Event()

        async def poll() -> None:
            while not all(s.up for s in self._slots.values()):
                await asyncio.sleep(0.02)
            done.set()

        fut = asyncio.run_coroutine_threadsafe(poll(), self._loop)
        ok = done.wait(timeout)
        fut.cancel()
        return ok

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect every connector and stop the loop thread; idempotent."""
        if self._thread is None or self._stopping:
            return
        self._stopping = True
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout)
        except Exception as e:  # a stuck disconnect must not block the process from exiting
            log.warning("connectors did not stop cleanly: %s", e)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> ConnectorHost:
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def healthy(self) -> dict[str, bool]:
        """Connector name -> True while it is connected and its last health check passed."""
        return {name: s.up for name, s in self._slots.items()}

    def ready(self) -> bool:
        """True when every connector is up."""
        return all(s.up for s in self._slots.values())

    def describe(self) -> list[str]:
        """One line per connector: name, type, state and last error (secrets scrubbed)."""
        out = []
        for name, s in self._slots.items():
            state = "up" if s.up else "down"
            out.append(f"connector {name} ({s.connector.spec.type}): {state}"
                       + (f" — {s.last_error}" if s.last_error and not s.up else ""))
        return out

    # -- operations --------------------------------------------------------------------------

    def activities(self, include: Any = None) -> dict[str, dict[str, Callable[[Any], Any]]]:
        """``{queue: {"<connector>.<operation>": async fn}}`` for a :class:`~kflow.worker.Worker`.

        Args:
            include: Other activities to serve alongside (anything ``Worker`` accepts: modules,
                functions, mappings); they are merged in.

        Raises:
            DuplicateActivityError: an included activity has the name of a connector operation.
        """
        out: dict[str, dict[str, Callable[[Any], Any]]] = {}
        for name, s in self._slots.items():
            q = out.setdefault(s.connector.spec.queue, {})
            for op_name in s.operations:
                q[f"{name}.{op_name}"] = self._activity(s, op_name)
        if include is not None:
            from kflow.streams.activities import DuplicateActivityError, build_registry

            dups: dict[tuple[str, str], list[str]] = {}
            for queue, defs in build_registry(include).items():
                q = out.setdefault(queue, {})
                for act_name, d in defs.items():
                    if act_name in q:
                        dups[(queue, act_name)] = [f"connector operation {act_name}", d.qualname]
                    q[act_name] = d.fn
            if dups:
                raise DuplicateActivityError(dups)
        return out

    def _activity(self, slot: _Slot, op_name: str) -> Callable[[Any], Any]:
        name = f"{slot.connector.name}.{op_name}"

        async def run(input: Any) -> Any:
            fut = asyncio.run_coroutine_threadsafe(self._invoke(slot, op_name, input), self._loop)
            try:
                return await asyncio.wrap_future(fut)
            except ConnectorError as e:
                if not e.retryable:
                    raise NonRetryableError(e.message, type=e.type) from e
                raise

        run.__name__ = run.__qualname__ = name
        run.__module__ = __name__
        return run

    def call(self, connector: str, operation: str, input: Any = None, timeout: float | None = None) -> Any:
        """Run one operation from any thread but the connector loop's and return its result.

        Raises:
            ConnectorError: the operation failed (``type``, ``retryable`` as an activity would report).
            KeyError: no such connector or operation.
        """
        slot = self._slots[connector]
        if operation not in slot.operations:
            raise KeyError(f"connector '{connector}' has no operation '{operation}' "
                           f"(it has: {', '.join(sorted(slot.operations))})")
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(self._invoke(slot, operation, input), self._loop)
        return fut.result(timeout)

    async def _invoke(self, slot: _Slot, op_name: str, input: Any) -> Any:
        spec = slot.connector.spec
        if not slot.connected:
            raise ConnectorUnavailable(spec.name, slot.last_error)
        try:
            return await slot.operations[op_name](input)
        except ConnectorError as e:
            e.message = scrub(e.message, spec)
            e.args = (scrub(str(e.args[0]), spec),) if e.args else e.args
            raise

    # -- supervision (connector loop) ---------------------------------------------------------

    async def _spawn(self, slot: _Slot) -> None:
        slot.task = asyncio.get_running_loop().create_task(self._supervise(slot), name=f"connector-{slot.connector.name}")

    def _set_up(self, slot: _Slot, up: bool) -> None:
        slot.up = up
        CONNECTOR_UP.labels(slot.connector.spec.name, slot.connector.spec.type).set(1 if up else 0)

    async def _supervise(self, slot: _Slot) -> None:
        c, spec = slot.connector, slot.connector.spec
        while not self._stopping:
            await self._connect(slot)
            # connected: check health until it fails, then reconnect
            while not self._stopping:
                await asyncio.sleep(self.health_interval)
                try:
                    ok = await asyncio.wait_for(c.health(), self.operation_timeout)
                    why = "health check failed"
                except Exception as e:
                    ok, why = False, scrub(_one_line(f"health check raised {type(e).__name__}: {e}"), spec)
                if ok:
                    if not slot.up:
                        self._set_up(slot, True)
                    continue
                log.warning("connector %s (%s): %s; reconnecting", spec.name, spec.type, why)
                slot.last_error = why
                self._set_up(slot, False)
                slot.connected = False
                await self._disconnect(slot)
                break

    async def _connect(self, slot: _Slot) -> None:
        c, spec = slot.connector, slot.connector.spec
        delay = self.backoff_initial
        attempt = 0
        while not self._stopping:
            attempt += 1
            try:
                await asyncio.wait_for(c.connect(), self.operation_timeout)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                slot.last_error = scrub(_one_line(f"{type(e).__name__}: {e}"), spec)
                wait = min(delay, self.backoff_max) * random.uniform(0.8, 1.2)
                log.warning("connector %s (%s): connection attempt %d failed: %s; retrying in %.1fs",
                            spec.name, spec.type, attempt, slot.last_error, wait)
                await self._disconnect(slot)
                await asyncio.sleep(wait)
                delay = min(delay * 2, self.backoff_max)
                continue
            slot.connected = True
            slot.last_error = ""
            self._set_up(slot, True)
            log.info("connector %s (%s) connected", spec.name, spec.type)
            return

    async def _disconnect(self, slot: _Slot) -> None:
        try:
            await asyncio.wait_for(slot.connector.disconnect(), self.operation_timeout)
        except Exception as e:
            log.debug("connector %s: disconnect failed: %s", slot.connector.name,
                      scrub(str(e), slot.connector.spec))

    async def _shutdown(self) -> None:
        for slot in self._slots.values():
            if slot.task is not None:
                slot.task.cancel()
        await asyncio.gather(*(s.task for s in self._slots.values() if s.task), return_exceptions=True)
        for slot in self._slots.values():
            slot.connected = False
            self._set_up(slot, False)
            await self._disconnect(slot)
            log.info("connector %s (%s) disconnected", slot.connector.name, slot.connector.spec.type)
