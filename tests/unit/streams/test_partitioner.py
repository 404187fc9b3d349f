"""murmur2 and partition_for agree with Kafka's Java client and librdkafka bit for bit."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kflow.streams.partitioner import murmur2, partition_for

# org.apache.kafka.common.utils.UtilsTest#testMurmur2 (signed Java ints)
JAVA_VECTORS = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}

# librdkafka src/rdmurmur2.c unittest (unsigned), covering every tail length and the empty key
LIBRDKAFKA_VECTORS = {
    b"kafka": 0xD067CF64,
    b"giberish123456789": 0x8F552B0C,
    b"1234": 0x9FC97B14,
    b"234": 0xE7C009CA,
    b"34": 0x873930DA,
    b"4": 0x5A4B5CA1,
    b"PreAmbleWillBeRemoved,ThePrePartThatIs": 0x78424F1C,
    b"reAmbleWillBeRemoved,ThePrePartThatIs": 0x4A62B377,
    b"eAmbleWillBeRemoved,ThePrePartThatIs": 0xE0E4E09E,
    b"AmbleWillBeRemoved,ThePrePartThatIs": 0x62B8B43F,
    b"": 0x106E08D9,
}


@pytest.mark.parametrize(("key", "expected"), list(JAVA_VECTORS.items()))
def test_murmur2_matches_the_java_client(key: bytes, expected: int) -> None:
    assert murmur2(key) == expected


@pytest.mark.parametrize(("key", "expected"), list(LIBRDKAFKA_VECTORS.items()))
def test_murmur2_matches_librdkafka(key: bytes, expected: int) -> None:
    assert murmur2(key) & 0xFFFFFFFF == expected
    assert -(2**31) <= murmur2(key) < 2**31


def _i32(x: int) -> int:
    x &= 0xFFFFFFFF
    return x - 0x100000000 if x & 0x80000000 else x


def java_murmur2(data: bytes) -> int:
    """A line-by-line transliteration of Utils.murmur2 with Java int arithmetic."""
    length = len(data)
    m, r = _i32(0x5BD1E995), 24
    h = _i32(_i32(0x9747B28C) ^ length)
    for i in range(length // 4):
        i4 = i * 4
        k = _i32((data[i4] & 0xFF) + ((data[i4 + 1] & 0xFF) << 8) + ((data[i4 + 2] & 0xFF) << 16)
                 + ((data[i4 + 3] & 0xFF) << 24))
        k = _i32(k * m)
        k = _i32(k ^ ((k & 0xFFFFFFFF) >> r))
        k = _i32(k * m)
        h = _i32(h * m)
        h = _i32(h ^ k)
    rest, base = length % 4, length & ~3
    if rest >= 3:
        h = _i32(h ^ ((data[base + 2] & 0xFF) << 16))
    if rest >= 2:
        h = _i32(h ^ ((data[base + 1] & 0xFF) << 8))
    if rest >= 1:
        h = _i32(h ^ (data[base] & 0xFF))
        h = _i32(h * m)
    h = _i32(h ^ ((h & 0xFFFFFFFF) >> 13))
    h = _i32(h * m)
    h = _i32(h ^ ((h & 0xFFFFFFFF) >> 15))
    return h


def test_the_transliteration_reproduces_the_published_vectors() -> None:
    for key, expected in JAVA_VECTORS.items():
        assert java_murmur2(key) == expected


@given(st.binary(max_size=64))
def test_murmur2_equals_the_java_transliteration_on_any_bytes(data: bytes) -> None:
    assert murmur2(data) == java_murmur2(data)


def test_partition_for_is_the_positive_hash_modulo_partitions() -> None:
    assert partition_for("foobar", 50) == (-790332482 & 0x7FFFFFFF) % 50 == 16
    for key, h in JAVA_VECTORS.items():
        for n in (1, 3, 8, 12, 64):
            assert partition_for(key, n) == (h & 0x7FFFFFFF) % n


@given(st.text(max_size=40), st.integers(1, 1000))
def test_str_keys_hash_as_utf8(key: str, partitions: int) -> None:
    p = partition_for(key, partitions)
    assert p == partition_for(key.encode("utf-8"), partitions)
    assert 0 <= p < partitions


@pytest.mark.parametrize("partitions", [0, -1])
def test_partition_count_must_be_positive(partitions: int) -> None:
    with pytest.raises(ValueError):
        partition_for("k", partitions)
