"""Activities of the bundled demo workflows (``demo.order``, ``demo.invoice``), all on the default queue.

They stand in for real systems (a warehouse, a payment provider, a carrier, a mailer) and are
deterministic: the same input gives the same output, ids are derived from the input by hashing,
and nothing sleeps longer than a few milliseconds, so demos and tests run fast and repeatably.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from kflow.model.errors import NonRetryableError
from kflow.worker import activity

__all__ = ["charge", "notify", "pick", "reserve", "ship"]

log = logging.getLogger("kflow.demo")

#: Most units of one SKU the demo warehouse holds.
STOCK_LIMIT = 100
_SIMULATED_LATENCY = 0.005  # seconds of pretend I/O per call


def _ref(prefix: str, *parts: Any) -> str:
    """A stable, readable id derived from the inputs."""
    digest = hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:10].upper()
    return f"{prefix}-{digest}"


def _order(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict) or "sku" not in data:
        raise NonRetryableError(f"expected an object with 'sku', got {data!r}", type="InvalidInput")
    return data


@activity("inventory.reserve")
def reserve(data: Any) -> dict[str, Any]:
    """Reserve ``qty`` units of ``sku``; ``ok`` is False above :data:`STOCK_LIMIT` units."""
    order = _order(data)
    qty = order.get("qty", 1)
    if not isinstance(qty, int) or qty < 0:
        raise NonRetryableError(f"'qty' must be a non-negative integer, got {qty!r}", type="InvalidInput")
    time.sleep(_SIMULATED_LATENCY)
    ok = qty <= STOCK_LIMIT
    return {"ok": ok, "sku": order["sku"], "qty": qty,
            "reservation_id": _ref("RES", order["sku"], qty) if ok else None}


@activity("payment.charge")
def charge(data: Any) -> dict[str, Any]:
    """Charge ``amount`` for ``sku``; returns the payment ``id`` and the ``amount`` charged."""
    order = _order(data)
    amount = order.get("amount", 0)
    if not isinstance(amount, (int, float)) or amount < 0:
        raise NonRetryableError(f"'amount' must be a non-negative number, got {amount!r}", type="InvalidAmount")
    time.sleep(_SIMULATED_LATENCY)
    return {"id": _ref("PAY", order["sku"], amount), "amount": amount, "status": "captured"}


@activity("ship")
def ship(sku: Any) -> str:
    """Hand the parcel for ``sku`` to the carrier; returns its tracking number."""
    time.sleep(_SIMULATED_LATENCY)
    return _ref("TRK", sku)


@activity("notify")
def notify(message: Any) -> dict[str, Any]:
    """Send a notification to the customer; returns what was sent."""
    text = str(message)
    log.info("notify: %s", text)
    return {"sent": True, "message": text, "id": _ref("MSG", text)}


@activity("warehouse.pick")
def pick(item: Any) -> Any:
    """Pick one line item. Numeric items come back incremented (a picked count); others unchanged."""
    time.sleep(_SIMULATED_LATENCY / 5)
    if isinstance(item, bool) or not isinstance(item, (int, float)):
        return item
    return item + 1
