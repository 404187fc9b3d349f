"""Hop timestamps: where a workflow's time goes between client, engine and worker.

A record that carries the ``kflow.hop`` header asks every process on its path to stamp the
records it produces in consequence with when it received the cause and when it produced the
effect (wall-clock microseconds). ``kflow bench --breakdown`` starts its instances with the header
and reads the stamps back from the ``tasks``, ``commands`` and ``state`` topics. Records without
the header cost nothing: no process adds the header on its own.

Header value: ``<who>,<received_us>,<produced_us>`` with ``who`` one of ``C`` (client), ``E``
(engine) or ``W`` (worker).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Optional

HEADER = "kflow.hop"


def now_us() -> int:
    return time.time_ns() // 1000


def asked(headers: Optional[Sequence[tuple[str, Any]]]) -> bool:
    """Whether a consumed record asks for hop stamps."""
    if not headers:
        return False
    for k, _ in headers:
        if k == HEADER:
            return True
    return False


def stamp(who: str, received_us: int, produced_us: Optional[int] = None) -> tuple[str, bytes]:
    """The header for a record produced in consequence of one received at ``received_us``."""
    return HEADER, f"{who},{received_us},{produced_us if produced_us is not None else now_us()}".encode()


def parse(value: bytes) -> tuple[str, int, int]:
    who, rec, prod = value.decode().split(",")
    return who, int(rec), int(prod)


def find(headers: Optional[Sequence[tuple[str, Any]]]) -> Optional[tuple[str, int, int]]:
    for k, v in headers or ():
        if k == HEADER and v:
            try:
                return parse(v)
            except ValueError:
                return None
    return None
