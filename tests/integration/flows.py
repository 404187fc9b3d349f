"""Activities and spec definitions shared by the engine integration tests."""

from __future__ import annotations

import threading

from kflow import NonRetryableError
from kflow.worker import activity

CALLS: dict[str, int] = {}
_lock = threading.Lock()


def _count(name: str) -> None:
    with _lock:
        CALLS[name] = CALLS.get(name, 0) + 1


@activity("t.inc", queue="default")
def inc(x):
    _count("t.inc")
    return x + 1


@activity("t.upper", queue="other")
def upper(s):
    return str(s).upper()


@activity("t.reserve")
def reserve(req):
    return {"ok": req["qty"] <= 10, "sku": req["sku"]}


@activity("t.declined")
def declined(_):
    raise NonRetryableError("card declined", type="CardDeclined")


@activity("t.echo")
async def echo(x):
    return x


def chain(name: str, n: int = 3, queue: str = "default") -> dict:
    steps = [{"id": "s0", "task": "t.inc", "queue": queue, "input": "input", "output": "v0"}]
    for i in range(1, n):
        steps.append({"id": f"s{i}", "task": "t.inc", "queue": queue, "input": f"v{i-1}", "output": f"v{i}"})
    steps.append({"id": "done", "succeed": f"v{n-1}"})
    return {"name": name, "version": 1, "steps": steps}


FLAKY: dict[str, int] = {}
UNDONE: dict[str, list[str]] = {}


@activity("t.flaky")
def flaky(req):
    """Fails the first ``req['fail']`` attempts for ``req['key']``, then returns the attempt count."""
    with _lock:
        FLAKY[req["key"]] = n = FLAKY.get(req["key"], 0) + 1
    if n <= req["fail"]:
        raise RuntimeError(f"attempt {n} of {req['key']} failed")
    return n


@activity("t.book")
def book(req):
    return {"key": req["key"], "what": req["what"]}


@activity("t.unbook")
def unbook(booking):
    with _lock:
        UNDONE.setdefault(booking["key"], []).append(booking["what"])
    return None


@activity("t.refuse")
def refuse(_):
    raise NonRetryableError("nothing left", type="SoldOut")
