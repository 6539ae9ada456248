"""DeepSeek's answer as the relay reads it (`proxy.answer`): inflated in bounded pieces, and
metered from its two ends when it is too large to keep."""

from __future__ import annotations

import gzip
import zlib

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.relay.tap import EDGE_BYTES, METER_BODY_BYTES, BodyTap
from proxy.upstream.answer import DECODE_PIECE, Decoder, Undecodable

USAGE = {
    "prompt_tokens": 10,
    "completion_tokens": 2,
    "prompt_cache_hit_tokens": 0,
    "prompt_cache_miss_tokens": 10,
}


def inflate(data: bytes, cuts: list[int]) -> bytes:
    decoder = Decoder()
    points = sorted({min(c, len(data)) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    out = [piece for chunk in pieces for piece in decoder.feed(chunk)]
    assert all(len(piece) <= DECODE_PIECE for piece in out)
    return b"".join(out) + decoder.finish()


@given(
    st.lists(st.binary(max_size=3000), min_size=1, max_size=3),
    st.lists(st.integers(0, 10_000), max_size=6),
    st.booleans(),
)
def test_gzip_and_zlib_bodies_inflate_however_they_arrive(
    members: list[bytes], cuts: list[int], gz: bool
) -> None:
    """Any split of the compressed bytes, several gzip members one after the other, or a
    zlib-wrapped deflate body: the same bytes come out, in pieces of bounded size."""
    data = b"".join(gzip.compress(m) for m in members) if gz else zlib.compress(b"".join(members))
    assert inflate(data, cuts) == b"".join(members)


def test_a_bomb_comes_out_in_bounded_pieces() -> None:
    bomb = gzip.compress(bytes(64 << 20))
    decoder = Decoder()
    sizes = [len(piece) for piece in decoder.feed(bomb)]
    assert sum(sizes) == 64 << 20 and max(sizes) <= DECODE_PIECE


def test_broken_compression_is_undecodable() -> None:
    whole = gzip.compress(b"x" * 5000)
    with pytest.raises(Undecodable, match="ended early"):
        inflate(whole[: len(whole) // 2], [])
    with pytest.raises(Undecodable):
        list(Decoder().feed(b"not compressed at all"))


def test_a_huge_body_is_metered_from_its_ends() -> None:
    """Past 4 MiB only the first and last 64 KiB are kept; the served model is read from the
    start and the usage object from the end, however they are split into reads, and text
    that merely looks like a key inside a string is not taken for one."""
    decoy = '"usage": {"prompt_tokens": 999999} {}}}'
    document = orjson.dumps(
        {
            "id": "c",
            "model": "deepseek-flash",
            "choices": [{"message": {"content": decoy + "z" * (METER_BODY_BYTES + EDGE_BYTES)}}],
            "usage": USAGE,
            "note": decoy,
        }
    )
    tap = BodyTap()
    for start in range(0, len(document), 70_001):
        tap.add(document[start : start + 70_001])
    assert tap.truncated and tap.whole() == b""
    assert tap.edges() == ("deepseek-flash", USAGE)


def test_a_body_under_the_limit_is_kept_whole() -> None:
    tap = BodyTap()
    tap.add(b'{"a":')
    tap.add(b"1}")
    assert not tap.truncated and tap.whole() == b'{"a":1}'
