"""The webhook subscriptions as the console shows them: declarations and each one's recent deliveries.

Delivery outcomes are not written to any topic: each ``kflow subscriptions run`` process keeps the
last :data:`~kflow.subscriptions.LOG_SIZE` deliveries per subscription in memory and serves them,
with the subscriptions table it delivers by, as JSON at ``/subscriptions`` on its operations port.
:class:`SubscriptionsView` asks every process named by ``KFLOW_SUBSCRIPTIONS_URL`` and merges their
answers (a consumer group splits the ``state`` partitions among the processes, so each knows the
deliveries of its own partitions). A process that does not answer is reported, not hidden. With no
process configured, the declarations are read from the subscriptions topic and no delivery is shown.
A restarted delivery process starts with an empty log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import httpx

from kflow.config import KafkaConfig
from kflow.model.errors import KflowError

__all__ = ["SubscriptionsView", "parse_urls"]

log = logging.getLogger("kflow.visibility")

#: Seconds one delivery process may take to answer.
TIMEOUT_S = 3.0
#: Most deliveries shown per subscription (the newest).
SHOWN = 100


def parse_urls(value: str) -> list[str]:
    """The base URLs of a comma-separated setting, without trailing slashes.

    Raises:
        KflowError: an entry is not an http(s) URL.
    """
    urls = []
    for part in value.split(","):
        url = part.strip().rstrip("/")
        if not url:
            continue
        if not url.startswith(("http://", "https://")):
            raise KflowError(f"KFLOW_SUBSCRIPTIONS_URL: expected http(s) URLs separated by commas, but got {url!r}")
        urls.append(url)
    return urls


class SubscriptionsView:
    """Reads the subscriptions and their delivery logs.

    Args:
        config: Kafka settings (for the subscriptions topic when no delivery process is named).
        urls: Base URLs of the delivery processes' operations endpoints.
        get: The HTTP GET used (``httpx.get`` by default).
    """

    def __init__(self, config: KafkaConfig, urls: list[str], get: Callable[..., Any] = httpx.get) -> None:
        self.config, self.urls, self._get = config, urls, get

    def read(self) -> dict[str, Any]:
        """``{"items": [subscription + deliveries], "sources": [{url, ok, error}], "deliveries": bool}``.

        Raises:
            KflowError: no delivery process is named and the subscriptions topic cannot be read.
        """
        if not self.urls:
            from kflow.subscriptions import read_subscriptions

            table = read_subscriptions(self.config)
            items = [{**s.model_dump(mode="json"), "deliveries": []} for _, s in sorted(table.items())]
            return {"items": items, "sources": [], "deliveries": False}
        merged: dict[str, dict[str, Any]] = {}
        sources = []
        for url in self.urls:
            try:
                res = self._get(f"{url}/subscriptions", timeout=TIMEOUT_S)
                res.raise_for_status()
                doc = res.json()
                subs = doc["subscriptions"]
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
                log.warning("cannot read the delivery log of %s: %s", url, e)
                sources.append({"url": url, "ok": False, "error": f"{type(e).__name__}: {e}"})
                continue
            sources.append({"url": url, "ok": True, "error": None})
            for sub in subs:
                have = merged.setdefault(sub["id"], {**sub, "deliveries": []})
                have["deliveries"] = have["deliveries"] + list(sub.get("deliveries") or [])
        for sub in merged.values():
            sub["deliveries"] = sorted(sub["deliveries"], key=lambda d: d.get("time_ms") or 0, reverse=True)[:SHOWN]
        return {"items": [merged[k] for k in sorted(merged)], "sources": sources, "deliveries": True}
