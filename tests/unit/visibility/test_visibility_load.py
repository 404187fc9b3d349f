"""100,000 instances in a SQLite visibility store: list, filter, count and page through the API.

Timings are printed (run with ``-s``) and reported in the README; nothing here asserts a speed,
only that every call answers correctly at that size. ``KFLOW_TEST_VISIBILITY_URL`` points the
test at another (empty) store, e.g. a fresh PostgreSQL database.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from kflow.config import VisibilityConfig
from kflow.visibility.server import VisibilityServer
from kflow.visibility.store import VisibilityStore

N = 100_000
T0 = 1_700_000_000_000
STATUSES = ["RUNNING"] * 3 + ["COMPLETED"] * 5 + ["FAILED", "CANCELLED"]
CUSTOMERS = [f"cust-{i}" for i in range(1000)]


def _rows() -> Iterator[dict[str, Any]]:
    rnd = random.Random(7)
    for i in range(N):
        status = STATUSES[i % len(STATUSES)]
        started = T0 + i * 1000
        yield {"instance_id": f"load-{i:06d}", "workflow": f"wf{i % 20}", "version": 1 + i % 3, "status": status,
               "tenant": f"tenant-{i % 50}", "started_ms": started,
               "closed_ms": started + 5000 if status != "RUNNING" else None,
               "search": {"customer": CUSTOMERS[rnd.randrange(len(CUSTOMERS))], "amount": i % 500}}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VisibilityStore, httpx.Client]]:
    """A read-only visibility server (no projection, no Kafka) over a store loaded with N instances."""
    config = VisibilityConfig(state_dir=str(tmp_path_factory.mktemp("load")), visibility_port=0,
                              visibility_url=os.environ.get("KFLOW_TEST_VISIBILITY_URL", ""))
    server = VisibilityServer(config, project=False)
    t = time.perf_counter()
    assert server.store.bulk_insert_instances(_rows()) == N
    print(f"\n[load] inserted {N} instances (+{2 * N} search attributes) in {time.perf_counter() - t:.1f}s")
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            yield server.store, client
    finally:
        server.close()


CALLS = [
    ("newest 50, no filter", {}),
    ("status=RUNNING", {"status": "RUNNING"}),
    ("workflow=wf7&version=2", {"workflow": "wf7", "version": 2}),
    ("tenant=tenant-13", {"tenant": "tenant-13"}),
    ("search customer:cust-42", {"search": "customer:cust-42"}),
    ("search customer + status=FAILED", {"search": "customer:cust-42", "status": "FAILED"}),
    ("started in a 1h window", {"started_after": T0 + 50_000_000, "started_before": T0 + 53_600_000}),
    ("closed in a 1h window", {"closed_after": T0 + 50_000_000, "closed_before": T0 + 53_600_000}),
]


def test_list_and_filter_at_100k(loaded):
    store, client = loaded
    timings = []
    for label, params in CALLS:
        t = time.perf_counter()
        r = client.get("/api/instances", params={**params, "limit": 50})
        elapsed = (time.perf_counter() - t) * 1000
        assert r.status_code == 200, r.text
        items = r.json()["items"]
        assert items, label
        starts = [i["started_ms"] for i in items]
        assert starts == sorted(starts, reverse=True)
        for key in ("status", "workflow", "tenant"):
            if key in params:
                assert {i[key] for i in items} == {params[key]}
        if "search" in params:
            assert {i["search"]["customer"] for i in items} == {"cust-42"}
        timings.append((label, elapsed, len(items)))
    t = time.perf_counter()
    counts = client.get("/api/instances/counts").json()
    timings.append(("counts per status (all)", (time.perf_counter() - t) * 1000, len(counts["counts"])))
    assert counts["total"] == N and counts["counts"]["RUNNING"] == 30_000
    t = time.perf_counter()
    counts = client.get("/api/instances/counts", params={"workflow": "wf3"}).json()
    timings.append(("counts per status (workflow=wf3)", (time.perf_counter() - t) * 1000, len(counts["counts"])))
    assert counts["total"] == N // 20
    for label, ms, n in timings:
        print(f"[load] {label:<40} {ms:8.1f} ms  ({n} rows)")


def test_cursor_paging_deep_into_100k(loaded):
    _, client = loaded
    cursor, seen, t = None, 0, time.perf_counter()
    for _ in range(20):
        r = client.get("/api/instances", params={"status": "COMPLETED", "limit": 200,
                                                 **({"cursor": cursor} if cursor else {})}).json()
        seen += len(r["items"])
        cursor = r["next_cursor"]
    print(f"[load] 20 pages of 200 (status=COMPLETED)          {(time.perf_counter() - t) * 1000:8.1f} ms total")
    assert seen == 4000 and cursor is not None
    one = client.get("/api/instances/load-000123").json()
    assert one["instance_id"] == "load-000123" and one["search"]["amount"] == 123
