"""``kflow.AsyncClient``: awaiting results blocks no thread, and every operation works from asyncio."""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

import kflow
from kflow.config import KafkaConfig
from kflow.model.errors import WorkflowFailedError

WAITING = {"name": "aio.wait", "version": 1, "steps": [
    {"id": "w", "wait": {"signal": "go", "timeout": "1h"}, "output": "g"},
    {"id": "done", "succeed": "{'got': g, 'input': input}"}]}


def test_awaited_results_hold_no_threads(engine_only_stack):
    stack = engine_only_stack
    n = 12

    async def main() -> list:
        # Two threads for everything the client runs in threads: if an awaited result held one,
        # the signals below could never be sent and the instances would never finish.
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=2))
        async with kflow.AsyncClient(config=stack.kafka_config(KafkaConfig)) as client:
            await client.deploy(WAITING)
            handles = [await client.start("aio.wait", i, id=f"aio-{i}-{uuid.uuid4().hex[:6]}") for i in range(n)]
            waits = [asyncio.ensure_future(h.result(timeout=90)) for h in handles]
            for i, h in enumerate(handles):
                await h.signal("go", i * 10)
            results = await asyncio.gather(*waits)
            status = await handles[0].status()
            assert status is not None and status["status"] == "COMPLETED"
            assert [e.type for e in await handles[0].history()][0] == "WorkflowStarted"
            return results

    results = asyncio.run(main())
    assert results == [{"got": i * 10, "input": i} for i in range(n)]


def test_async_errors_and_timeouts(engine_only_stack):
    stack = engine_only_stack

    async def main() -> None:
        async with kflow.AsyncClient(config=stack.kafka_config(KafkaConfig)) as client:
            await client.deploy(WAITING)
            h = await client.start("aio.wait", 1)
            with pytest.raises(TimeoutError):
                await h.result(timeout=0.5)
            await h.cancel("no longer needed")
            with pytest.raises(WorkflowFailedError) as e:
                await client.result(h.id, timeout=60)
            assert e.value.status == "CANCELLED"
            done = await client.wait_many([h.id], timeout=10)
            assert done[h.id]["status"] == "CANCELLED"

    asyncio.run(main())
