"""``kflow.AsyncClient``: the client for asyncio applications.

Every call is a coroutine. Waiting for results blocks no thread: the client's state watcher
completes an asyncio future when the terminal state arrives, so thousands of ``await
handle.result()`` run side by side. Calls that do broker I/O once (deploy, start, signal, query,
status, history) run the synchronous :class:`~kflow.client.Client` in a worker thread
(librdkafka does the network work and releases the GIL).

Example:
    >>> async def main():  # doctest: +SKIP
    ...     async with kflow.AsyncClient("localhost:9092") as client:
    ...         handle = await client.start("order", {"sku": "A1"})
    ...         print(await handle.result(timeout=60))
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from kflow.client import Client, Deployed, WorkflowHandle, _outcome
from kflow.config import KafkaConfig
from kflow.converter import from_json
from kflow.model.messages import Event, JSONValue

__all__ = ["AsyncClient", "AsyncWorkflowHandle"]

T = TypeVar("T")


class AsyncWorkflowHandle(Generic[T]):
    """An instance seen from asyncio: the same operations as :class:`~kflow.client.WorkflowHandle`, awaited."""

    __slots__ = ("_client", "_handle")

    def __init__(self, client: AsyncClient, handle: WorkflowHandle[T]) -> None:
        self._client = client
        self._handle = handle

    @property
    def id(self) -> str:
        return self._handle.id

    async def result(self, timeout: float = 30, type: Any = None) -> T:
        """The instance's result, converted to ``type`` (default: the handle's); see :meth:`WorkflowHandle.result`."""
        h = self._handle
        starts = {h.id: h.start_command_id} if h.start_command_id is not None else None
        states = await self._client.sync.wait_many_async([h.id], timeout, starts=starts)
        if h.id not in states:
            raise TimeoutError(f"workflow {h.id} did not finish within {timeout:g}s")
        value = _outcome(h.id, states[h.id])
        wanted = type if type is not None else h.result_type
        return from_json(value, wanted, f"the result of workflow {h.id}") if wanted is not None else value  # type: ignore[no-any-return]

    async def status(self, *, timeout: float = 10.0, scan: bool = False) -> dict[str, Any] | None:
        return await self._client.status(self.id, timeout=timeout, scan=scan)

    async def history(self, *, timeout: float = 10.0, scan: bool = False) -> list[Event]:
        return await self._client.history(self.id, timeout=timeout, scan=scan)

    async def query(self, name: str, *args: Any, timeout: float = 10.0) -> JSONValue:
        return await self._client.query(self.id, name, *args, timeout=timeout)

    async def signal(self, name: str, data: Any = None) -> None:
        await self._client.signal(self.id, name, data)

    async def update(self, name: str, data: Any = None, *, update_id: str | None = None,
                     timeout: float = 30.0) -> JSONValue:
        return await self._client.update(self.id, name, data, update_id=update_id, timeout=timeout)

    async def cancel(self, reason: str = "") -> None:
        await self._client.cancel(self.id, reason)

    async def terminate(self, reason: str = "") -> None:
        await self._client.terminate(self.id, reason)


class AsyncClient:
    """The asyncio face of :class:`~kflow.client.Client` (same arguments, same errors)."""

    def __init__(self, bootstrap: str | None = None, *, topic_prefix: str | None = None,
                 config: KafkaConfig | None = None, connect_timeout: float = 5.0,
                 request_timeout: float = 30.0) -> None:
        #: The synchronous client underneath (for code that needs both).
        self.sync = Client(bootstrap, topic_prefix=topic_prefix, config=config, connect_timeout=connect_timeout,
                           request_timeout=request_timeout)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await asyncio.to_thread(self.sync.close)

    async def deploy(self, spec: Mapping[str, Any] | str | Path) -> Deployed:
        return await asyncio.to_thread(self.sync.deploy, spec)

    async def start(self, workflow: Any, input: Any = None, **kw: Any) -> AsyncWorkflowHandle[Any]:
        """Start an instance; the arguments of :meth:`Client.start <kflow.client.Client.start>`."""
        return AsyncWorkflowHandle(self, await asyncio.to_thread(self.sync.start, workflow, input, **kw))

    def handle(self, id: str) -> AsyncWorkflowHandle[Any]:
        return AsyncWorkflowHandle(self, self.sync.handle(id))

    async def signal(self, id: str, name: str, data: Any = None) -> None:
        await asyncio.to_thread(self.sync.signal, id, name, data)

    async def cancel(self, id: str, reason: str = "") -> None:
        await asyncio.to_thread(self.sync.cancel, id, reason)

    async def terminate(self, id: str, reason: str = "") -> None:
        await asyncio.to_thread(self.sync.terminate, id, reason)

    async def set_priority(self, id: str, level: str | int, reason: str = "") -> None:
        """Change the priority level of an open instance; see :meth:`kflow.Client.set_priority`."""
        await asyncio.to_thread(self.sync.set_priority, id, level, reason)

    async def retry(self, id: str, from_step: str | None = None, input_patch: dict[str, Any] | None = None,
                    **kw: Any) -> None:
        """Re-open a FAILED instance; the arguments of :meth:`Client.retry <kflow.client.Client.retry>`."""
        await asyncio.to_thread(lambda: self.sync.retry(id, from_step, input_patch, **kw))

    async def resolve_incident(self, id: str, incident_id: str, action: str, **kw: Any) -> None:
        """Resolve an open incident; the arguments of :meth:`Client.resolve_incident <kflow.client.Client.resolve_incident>`."""
        await asyncio.to_thread(lambda: self.sync.resolve_incident(id, incident_id, action, **kw))

    async def query(self, id: str, name: str, *args: Any, timeout: float = 10.0) -> JSONValue:
        return await asyncio.to_thread(lambda: self.sync.query(id, name, *args, timeout=timeout))

    async def update(self, id: str, name: str, data: Any = None, *, update_id: str | None = None,
                     timeout: float = 30.0) -> JSONValue:
        """Send an update and await its answer; see :meth:`kflow.Client.update`."""
        return await asyncio.to_thread(lambda: self.sync.update(id, name, data, update_id=update_id, timeout=timeout))

    async def status(self, id: str, *, timeout: float = 10.0, scan: bool = False) -> dict[str, Any] | None:
        return await asyncio.to_thread(lambda: self.sync.status(id, timeout=timeout, scan=scan))

    async def history(self, id: str, *, timeout: float = 10.0, scan: bool = False) -> list[Event]:
        return await asyncio.to_thread(lambda: self.sync.history(id, timeout=timeout, scan=scan))

    async def result(self, id: str, timeout: float = 30, type: Any = None) -> Any:
        """Wait until instance ``id`` finishes; its result (converted to ``type`` when given)."""
        return await self.handle(id).result(timeout, type)

    async def wait_many(self, ids: Iterable[str], timeout: float = 60) -> dict[str, dict[str, Any]]:
        """Terminal state records of the ids that finished within ``timeout`` (failures returned, not raised)."""
        return await self.sync.wait_many_async(ids, timeout)

    # -- schedules (see Client.create_schedule and docs/schedules.md) ----------------------------
    async def create_schedule(self, id: str, workflow: str, **kw: Any) -> Any:
        """Create schedule ``id`` of ``workflow``; the keywords are :meth:`Client.create_schedule`'s."""
        return await asyncio.to_thread(lambda: self.sync.create_schedule(id, workflow, **kw))

    async def schedules(self) -> dict[str, dict[str, Any]]:
        return await asyncio.to_thread(self.sync.schedules)

    async def describe_schedule(self, id: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.sync.describe_schedule, id)

    async def pause_schedule(self, id: str, note: str = "") -> None:
        await asyncio.to_thread(self.sync.pause_schedule, id, note)

    async def unpause_schedule(self, id: str, note: str = "") -> None:
        await asyncio.to_thread(self.sync.unpause_schedule, id, note)

    async def trigger_schedule(self, id: str, overlap: str | None = None) -> None:
        await asyncio.to_thread(self.sync.trigger_schedule, id, overlap)

    async def backfill_schedule(self, id: str, start: Any, end: Any) -> None:
        await asyncio.to_thread(self.sync.backfill_schedule, id, start, end)

    async def delete_schedule(self, id: str, reason: str = "") -> None:
        await asyncio.to_thread(self.sync.delete_schedule, id, reason)
