"""How a search attribute value is matched: the text the visibility store indexes for it.

Pure (standard library and ``orjson``), so every side that compares search attributes uses the
same rule: the visibility store when it indexes them, ``kflow list`` on state records read straight
from Kafka, and a batch's ``WHERE`` query (:mod:`kflow.batch.plan`).
"""

from __future__ import annotations

import math
from typing import Any

import orjson

__all__ = ["MAX_SEARCH_VALUE", "search_text"]

#: Longest search attribute value indexed; longer values are cut (and still shown in full in ``search``).
MAX_SEARCH_VALUE = 1024


def search_text(value: Any) -> str:
    """The indexed text of a search attribute value: strings as they are, other values as JSON.

    Integral floats are written as integers so ``5`` and ``5.0`` match the same filter.
    """
    if isinstance(value, str):
        return value[:MAX_SEARCH_VALUE]
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    return orjson.dumps(value).decode()[:MAX_SEARCH_VALUE]
