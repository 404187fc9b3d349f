"""Map a record key to its partition exactly as Kafka's Java client and librdkafka do.

Every kflow producer uses librdkafka's ``murmur2_random`` partitioner, which for a non-null key
is the Java client's default: ``(murmur2(key) & 0x7fffffff) % partitions``. This module is the
pure-Python twin of that rule, so processors can tell which partition (and so which owner) an
instance id belongs to without asking a producer.
"""

from __future__ import annotations

import struct

__all__ = ["murmur2", "partition_for"]

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF
_WORDS = struct.Struct("<I")


def _to_signed(h: int) -> int:
    """Reinterpret an unsigned 32-bit value as Java's signed ``int``."""
    return h - 0x100000000 if h & 0x80000000 else h


def _tail(h: int, data: bytes, start: int) -> int:
    """Mix the last ``len(data) % 4`` bytes into ``h`` (the Java switch fall-through)."""
    rest = len(data) - start
    if rest == 0:
        return h
    if rest == 3:
        h ^= data[start + 2] << 16
    if rest >= 2:
        h ^= data[start + 1] << 8
    h ^= data[start]
    return (h * _M) & _MASK


def murmur2(data: bytes) -> int:
    """Kafka's ``org.apache.kafka.common.utils.Utils.murmur2``: a signed 32-bit hash."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    end = length & ~3
    for (k,) in _WORDS.iter_unpack(data[:end]):
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    h = _tail(h, data, end)
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return _to_signed(h)


def partition_for(key: str | bytes, partitions: int) -> int:
    """The partition a non-null ``key`` lands on among ``partitions`` (UTF-8 for ``str`` keys)."""
    if partitions <= 0:
        raise ValueError(f"partitions must be positive, got {partitions}")
    raw = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    return (murmur2(raw) & 0x7FFFFFFF) % partitions
