"""``kflow bench --breakdown``: where a chain3 workflow's time goes, hop by hop.

The bench driver starts the latency phase's instances with the ``kflow.hop`` header (see
:mod:`kflow._hops`), so the engine stamps the tasks and the terminal state record it produces and
the worker stamps the results. This module reads those stamps back from the task and command
topics and turns them into one row per hop: client produce → engine consume → decided →
(commit + fetch) → worker consume → activity done → (fetch) → engine consume → … → client sees
the result. All processes run on one machine, so their wall clocks agree.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Optional

from confluent_kafka import Consumer

from kflow import _hops
from kflow.config import KafkaConfig
from kflow.readend import EndReader, at_end

#: Hop names in the order a chain3 workflow crosses them.
HOPS = (
    ("client → engine", "client produced the start; the engine polled it"),
    ("engine decide", "engine polled a command; produced its outputs"),
    ("engine → worker", "outputs produced; worker consumed the task (commit + fetch)"),
    ("worker run", "worker consumed the task; produced the result"),
    ("worker → engine", "result produced; engine polled it (fetch)"),
    ("engine → client", "terminal state produced; client read it (commit + fetch)"),
)

#: Most seconds reading the stamps of one topic may take.
_READ_SECONDS = 120.0


@dataclass
class HopRow:
    hop: str
    what: str
    count: int
    p50_ms: float
    p99_ms: float
    per_workflow_p50_ms: float


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def read_stamps(cfg: KafkaConfig, topic: str, since: dict[int, int], keys: set[str]) -> dict[str, list[tuple[str, int, int]]]:
    """Every hop stamp on ``topic`` from the offsets ``since`` to the high watermark, by instance."""
    out: dict[str, list[tuple[str, int, int]]] = {}
    with EndReader(cfg.consumer_conf(f"bench-breakdown-{uuid.uuid4().hex[:6]}")) as reader:
        for m in reader.read(topic, start=since, timeout=_READ_SECONDS, what=f"reading the hop stamps on {topic}"):
            key = (m.key() or b"").decode()
            if key not in keys:
                continue
            st = _hops.find(m.headers())
            if st is not None:
                out.setdefault(key, []).append(st)
    return out


def offsets_now(cfg: KafkaConfig, topic: str) -> dict[int, int]:
    """``partition -> high watermark`` of ``topic`` now: where :func:`read_stamps` starts later."""
    c = Consumer(cfg.consumer_conf(f"bench-breakdown-{uuid.uuid4().hex[:6]}"))
    try:
        md = c.list_topics(topic, timeout=10)
        return {tp.partition: tp.offset for tp in at_end(c, topic, md.topics[topic].partitions, 10)}
    finally:
        c.close()


def breakdown(driver_hops: dict[str, tuple[int, Optional[tuple[str, int, int]], int]],
              task_stamps: dict[str, list[tuple[str, int, int]]],
              result_stamps: dict[str, list[tuple[str, int, int]]]) -> list[HopRow]:
    """Per-hop latencies from the stamps of every instance that has a complete set."""
    per: dict[str, list[float]] = {h: [] for h, _ in HOPS}
    per_wf: dict[str, list[float]] = {h: [] for h, _ in HOPS}
    for iid, (sent, final, seen) in driver_hops.items():
        engine = sorted(st for st in task_stamps.get(iid, []) if st[0] == "E")
        worker = sorted(st for st in result_stamps.get(iid, []) if st[0] == "W")
        if final is None or not sent or not engine or len(worker) != len(engine):
            continue
        engine.append(final)
        hops: dict[str, list[float]] = {h: [] for h, _ in HOPS}
        hops["client → engine"].append(engine[0][1] - sent)
        for i, (_, rec, prod) in enumerate(engine):
            hops["engine decide"].append(prod - rec)
            if i < len(worker):
                _, wrec, wprod = worker[i]
                hops["engine → worker"].append(wrec - prod)
                hops["worker run"].append(wprod - wrec)
                hops["worker → engine"].append(engine[i + 1][1] - wprod)
        hops["engine → client"].append(seen - final[2])
        for h, vals in hops.items():
            per[h].extend(v / 1000 for v in vals)
            per_wf[h].append(sum(vals) / 1000)
    return [HopRow(h, what, len(per[h]), round(_pct(per[h], 0.5), 2), round(_pct(per[h], 0.99), 2),
                   round(_pct(per_wf[h], 0.5), 2)) for h, what in HOPS]


def as_dicts(rows: list[HopRow]) -> list[dict[str, Any]]:
    return [r.__dict__.copy() for r in rows]
