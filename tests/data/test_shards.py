"""Token shards: header round trip, dtype choice, and refusal of corrupt or mismatched files;
property-based tests of the writer and the reader (any tokens round trip, any damage is refused cleanly)."""

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memory_mosaics.data.shards import (
    HEADER_SIZE,
    ShardError,
    ShardWriter,
    read_shard,
    read_shard_header,
    write_shard,
)

FP = "byte-5f19704a6e7a6d77"


def test_round_trip_uint16(tmp_path):
    tokens = np.array([0, 1, 256, 65535, 7], dtype=np.int64)
    write_shard(tmp_path / "a.bin", tokens, FP)
    header = read_shard_header(tmp_path / "a.bin")
    assert header == {"version": 1, "dtype": np.dtype("<u2"), "count": 5, "fingerprint": FP}
    data = read_shard(tmp_path / "a.bin", expected_fingerprint=FP)
    assert isinstance(data, np.memmap) and data.dtype == np.uint16
    np.testing.assert_array_equal(data, tokens)
    assert (tmp_path / "a.bin").stat().st_size == HEADER_SIZE + 5 * 2
    # The layout documented in shards.py: magic, version, dtype code, count, fingerprint.
    raw = (tmp_path / "a.bin").read_bytes()
    assert raw[:8] == b"MMTOKENS" and struct.unpack_from("<IIQ", raw, 8) == (1, 2, 5)
    assert raw[24:88].rstrip(b"\0").decode() == FP


def test_uint32_past_65536_tokens_in_the_vocabulary(tmp_path):
    tokens = np.array([70000, 3, 50256])
    write_shard(tmp_path / "big.bin", tokens, FP)
    assert read_shard(tmp_path / "big.bin").dtype == np.uint32
    write_shard(tmp_path / "small.bin", [3, 4], FP, vocab_size=100_000)  # vocabulary decides, not values
    assert read_shard(tmp_path / "small.bin").dtype == np.uint32
    np.testing.assert_array_equal(read_shard(tmp_path / "big.bin"), tokens)


def test_streaming_writer_and_empty_shard(tmp_path):
    with ShardWriter(tmp_path / "s.bin", FP, np.uint16) as writer:
        for chunk in ([1, 2], [], [3, 4, 5]):
            writer.write(chunk)
    np.testing.assert_array_equal(read_shard(tmp_path / "s.bin"), [1, 2, 3, 4, 5])
    write_shard(tmp_path / "empty.bin", np.array([], dtype=np.int64), FP)
    assert read_shard(tmp_path / "empty.bin").shape == (0,)


def test_writer_leaves_nothing_behind_on_failure(tmp_path):
    with pytest.raises(ValueError, match=r"0\.\.65535"), ShardWriter(tmp_path / "x.bin", FP, np.uint16) as w:
        w.write([1, 2])
        w.write([70000])
    assert list(tmp_path.iterdir()) == []


def _shard(tmp_path, n=10):
    path = tmp_path / "t.bin"
    write_shard(path, np.arange(n), FP)
    return path


def test_refuses_truncated_and_padded_files(tmp_path):
    path = _shard(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[:-3])
    with pytest.raises(ShardError, match=r"t\.bin is truncated.*promises 10 tokens"):
        read_shard(path)
    path.write_bytes(raw[:50])
    with pytest.raises(ShardError, match=r"t\.bin is truncated.*header"):
        read_shard(path)
    path.write_bytes(raw + b"\0\0")
    with pytest.raises(ShardError, match="longer than its header says"):
        read_shard(path)


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [(0, b"NOTMOSAI", "not a mosaic token shard"), (8, struct.pack("<I", 9), "format version 9")],
)
def test_refuses_bad_magic_and_version(tmp_path, offset, value, message):
    path = _shard(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(value)] = value
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=message):
        read_shard(path)


def test_refuses_unknown_dtype_and_missing_file(tmp_path):
    path = _shard(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[12:16] = struct.pack("<I", 8)
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="unknown dtype code 8"):
        read_shard(path)
    with pytest.raises(ShardError, match=r"nope\.bin does not exist"):
        read_shard(tmp_path / "nope.bin")


def test_refuses_a_shard_of_another_tokenizer(tmp_path):
    path = _shard(tmp_path)
    with pytest.raises(ShardError, match=r"written with tokenizer 'byte-.*not the expected 'bpe-1234'"):
        read_shard(path, expected_fingerprint="bpe-1234")


# -- properties -----------------------------------------------------------------------------------------

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def token_arrays(draw):
    vocab = draw(st.sampled_from([1, 2, 257, 50257, 1 << 16, (1 << 16) + 1, 1 << 20]))
    tokens = draw(st.lists(st.integers(0, vocab - 1), max_size=300))
    chunks = draw(st.lists(st.integers(0, len(tokens)), max_size=4))
    return vocab, np.array(tokens, dtype=np.int64), sorted(chunks)


@PROPERTY
@given(case=token_arrays())
def test_any_tokens_round_trip_whole_or_streamed(tmp_path, case):
    vocab, tokens, cuts = case
    write_shard(tmp_path / "a.bin", tokens, FP, vocab_size=vocab)
    with ShardWriter(tmp_path / "b.bin", FP, np.uint16 if vocab <= 1 << 16 else np.uint32) as writer:
        for piece in np.split(tokens, cuts):
            writer.write(piece)
    for name in ("a.bin", "b.bin"):
        data = read_shard(tmp_path / name, expected_fingerprint=FP)
        np.testing.assert_array_equal(data, tokens)
        assert data.dtype == (np.uint16 if vocab <= 1 << 16 else np.uint32)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()


@PROPERTY
@given(
    tokens=st.lists(st.integers(0, 65535), min_size=1, max_size=64),
    edit=st.sampled_from(["truncate", "append", "overwrite"]),
    at=st.integers(0, 10_000),
    junk=st.binary(min_size=1, max_size=16),
)
def test_a_damaged_shard_is_refused_or_reads_its_own_size(tmp_path, tokens, edit, at, junk):
    """Whatever is done to a shard's bytes, the reader raises ShardError or returns exactly the number
    of tokens its header promises and its size holds; it never fails any other way."""
    write_shard(tmp_path / "s.bin", tokens, FP, vocab_size=1 << 16)
    raw = bytearray((tmp_path / "s.bin").read_bytes())
    at %= len(raw)
    if edit == "truncate":
        raw = raw[:at]
    elif edit == "append":
        raw += junk
    else:
        raw[at : at + len(junk)] = junk[: len(raw) - at]
    (tmp_path / "s.bin").write_bytes(bytes(raw))
    try:
        data = read_shard(tmp_path / "s.bin", expected_fingerprint=FP)
    except ShardError:
        return
    assert HEADER_SIZE + data.size * data.dtype.itemsize == len(raw)
    if edit == "overwrite" and at >= HEADER_SIZE:  # only tokens changed: same count, same dtype
        assert data.size == len(tokens) and data.dtype == np.uint16
