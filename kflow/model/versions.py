"""Workflow versions: semantic versions (``1.4.0``) and plain integers, as one ordered ``int`` on the wire.

A definition's version is either an integer ``N`` (kept as-is, and meaning ``N.0.0`` wherever a
semantic version is compared) or a semantic version ``MAJOR.MINOR.PATCH``. Every record that carries
a version (definitions, commands, events, state) carries one Avro ``int``, its *version code*:
``N`` for an integer and for ``N.0.0`` (so ``2`` and ``"2.0.0"`` are the same version), otherwise
``2**30 | MAJOR << 20 | MINOR << 10 | PATCH`` with each part below 1024. Codes are compared through
:func:`version_tuple`, never as integers, and shown by :func:`format_version` (``2``, ``1.4.0``).
"""

from __future__ import annotations

import re
from typing import Union

__all__ = ["SEMVER_FLAG", "format_version", "is_version_text", "version_code", "version_tuple"]

#: The bit that marks a packed ``MAJOR.MINOR.PATCH`` code; plain integer versions stay below it.
SEMVER_FLAG = 1 << 30
_PART = 1 << 10
_SEMVER = re.compile(r"^\s*v?(\d+)\.(\d+)\.(\d+)\s*$")


def is_version_text(text: str) -> bool:
    """Whether ``text`` is an exact version (``3`` or ``1.4.0``), not a range."""
    return bool(_SEMVER.match(text) or text.strip().isdigit())


def version_code(value: Union[int, str]) -> int:
    """The wire code of an integer version or a ``MAJOR.MINOR.PATCH`` text.

    Raises:
        ValueError: not a positive integer below 2**30, not ``MAJOR.MINOR.PATCH``, or a part of
            1024 or more (the message says which).
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a version like 3 or '1.4.0', but got {value!r}")
    if isinstance(value, int):
        if not 1 <= value < SEMVER_FLAG:
            raise ValueError(f"expected an integer version from 1 to {SEMVER_FLAG - 1}, but got {value}")
        return value
    text = str(value).strip()
    if text.isdigit():
        return version_code(int(text))
    m = _SEMVER.match(text)
    if m is None:
        raise ValueError(f"expected a version like 3 or '1.4.0' (MAJOR.MINOR.PATCH), but got {value!r}")
    major, minor, patch = (int(g) for g in m.groups())
    if minor == 0 and patch == 0 and major >= 1:
        return version_code(major)
    if max(major, minor, patch) >= _PART:
        raise ValueError(f"expected each part of version {text!r} below {_PART}")
    return SEMVER_FLAG | major << 20 | minor << 10 | patch


def version_tuple(code: int) -> tuple[int, int, int]:
    """``(MAJOR, MINOR, PATCH)`` of a version code; an integer version ``N`` is ``(N, 0, 0)``."""
    if code & SEMVER_FLAG:
        return (code >> 20) & (_PART - 1), (code >> 10) & (_PART - 1), code & (_PART - 1)
    return code, 0, 0


def format_version(code: int) -> str:
    """How a version code is shown and keyed (``name@<this>``): ``3`` or ``1.4.0``."""
    if isinstance(code, int) and code & SEMVER_FLAG:
        return "{}.{}.{}".format(*version_tuple(code))
    return str(code)
