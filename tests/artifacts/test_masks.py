"""Binary-mask codec: round trips, sizes against packbits and the entropy bound, corruption."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from rmt_deploy.artifacts.masks import (
    MaskStats,
    decode_mask,
    decode_zero_indices,
    encode_mask,
    entropy_bound_bytes,
    mask_stats,
)
from rmt_deploy.errors import ArtifactError, InputError

DENSITIES = [0.0, 1.0, 0.5, 0.025, 0.1, 0.9, 0.975, 0.3]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _random_mask(shape, zeros: float, seed: int) -> np.ndarray:
    """Bool mask with i.i.d. False entries at rate `zeros` (0 -> all True, 1 -> all False)."""
    return np.asarray(np.random.default_rng(seed).random(shape) >= zeros)


def _check_round_trip(keep: np.ndarray) -> bytes:
    blob = encode_mask(keep)
    out = decode_mask(blob)
    assert out.dtype == np.bool_ and out.shape == keep.shape
    np.testing.assert_array_equal(out, keep)
    shape, zeros = decode_zero_indices(blob)
    assert shape == keep.shape and zeros.dtype == np.int64
    np.testing.assert_array_equal(zeros, np.flatnonzero(~keep))
    stats = mask_stats(blob)
    assert stats == MaskStats(keep.shape, keep.size, int((~keep).sum()), stats.method, len(blob))
    assert len(blob) <= len(np.packbits(keep)) + 64
    return blob


def _refresh_crc(blob: bytes | bytearray) -> bytes:
    """Recompute the stored CRC so that a crafted blob reaches the structural checks."""
    blob = bytearray(blob)
    blob[8:12] = struct.pack("<I", zlib.crc32(bytes(blob[12:]), zlib.crc32(bytes(blob[4:8]))))
    return bytes(blob)


def _expect_artifact_error(blob, stats: bool = True) -> None:
    """Decoding raises ArtifactError; so does mask_stats unless only the payload is bad."""
    for fn in (decode_mask, decode_zero_indices, *([mask_stats] if stats else [])):
        with pytest.raises(ArtifactError):
            fn(blob)


# ---------------------------------------------------------------- round trips


@SETTINGS
@given(
    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=12),
    zeros=st.one_of(st.sampled_from(DENSITIES), st.floats(0.0, 1.0)),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_random_density(shape, zeros, seed):
    _check_round_trip(_random_mask(shape, zeros, seed))


@SETTINGS
@given(keep=hnp.arrays(np.bool_, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40)))
def test_round_trip_arbitrary_patterns(keep):
    _check_round_trip(keep)


@SETTINGS
@given(n=st.integers(1, 20_000), zeros=st.sampled_from(DENSITIES), seed=st.integers(0, 2**32 - 1))
def test_round_trip_long_vectors(n, zeros, seed):
    _check_round_trip(_random_mask((n,), zeros, seed))


@pytest.mark.parametrize(
    "keep",
    [
        np.ones((), bool), np.zeros((), bool), np.zeros((0,), bool), np.zeros((3, 0, 5), bool),
        np.ones(1, bool), np.zeros(1, bool), np.ones((1,) * 32, bool), np.zeros((2,) * 12, bool),
    ],
    ids=lambda k: f"{k.shape}-{k.all()}",
)
def test_edge_shapes(keep):
    _check_round_trip(keep)


def test_non_contiguous_and_structured_masks():
    base = _random_mask((64, 48), 0.1, 1)
    _check_round_trip(base.T)
    _check_round_trip(base[::3, 1::2])
    runs = np.ones(100_000, bool)
    runs[10:5_000] = False
    runs[-3:] = False
    _check_round_trip(runs)
    _check_round_trip(~runs)
    one_zero_at_end = np.ones(1_000_000, bool)
    one_zero_at_end[-1] = False
    _check_round_trip(one_zero_at_end)


def test_methods_chosen_by_density():
    n = 200_000
    assert mask_stats(encode_mask(_random_mask(n, 0.025, 0))).method == "rice-zeros"
    assert mask_stats(encode_mask(_random_mask(n, 0.975, 0))).method == "rice-ones"
    assert mask_stats(encode_mask(_random_mask(n, 0.5, 0))).method == "packbits"
    assert mask_stats(encode_mask(np.ones(n, bool))).method == "const-ones"
    assert mask_stats(encode_mask(np.zeros(n, bool))).method == "const-zeros"


def test_accepts_bytearray_and_memoryview():
    keep = _random_mask((30, 7), 0.1, 3)
    blob = encode_mask(keep)
    np.testing.assert_array_equal(decode_mask(bytearray(blob)), keep)
    np.testing.assert_array_equal(decode_mask(memoryview(blob)), keep)


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000, 123_457])
@pytest.mark.parametrize("zeros", [0.0, 1.0, 0.5, 0.45, 0.55])
def test_never_much_bigger_than_packbits(n, zeros):
    keep = _random_mask((n,), zeros, n)
    assert len(encode_mask(keep)) <= len(np.packbits(keep)) + 64


@pytest.mark.parametrize("zeros", [0.025, 0.1, 0.9])
def test_close_to_entropy_bound(zeros):
    keep = _random_mask((1536, 1024), zeros, 7)
    blob = encode_mask(keep)
    assert len(blob) <= 1.05 * entropy_bound_bytes(keep)
    np.testing.assert_array_equal(decode_mask(blob), keep)


def test_entropy_bound_values():
    assert entropy_bound_bytes(np.ones(100, bool)) == 0.0
    assert entropy_bound_bytes(np.zeros(100, bool)) == 0.0
    assert entropy_bound_bytes(np.zeros(0, bool)) == 0.0
    half = np.arange(800) % 2 == 0
    assert entropy_bound_bytes(half) == pytest.approx(100.0)


# ---------------------------------------------------------------- input validation


@pytest.mark.parametrize(
    "bad", [np.ones(4, np.uint8), np.ones(4, np.float32), np.ones((2, 2), np.int64), [True, False], None]
)
def test_non_bool_input_raises_input_error(bad):
    with pytest.raises(InputError):
        encode_mask(bad)
    with pytest.raises(InputError):
        entropy_bound_bytes(bad)


# ---------------------------------------------------------------- corruption

SMALL_BLOBS = {
    "rice-zeros": encode_mask(_random_mask((40, 25), 0.1, 11)),
    "rice-ones": encode_mask(_random_mask((40, 25), 0.9, 12)),
    "packbits": encode_mask(_random_mask((13, 11), 0.5, 13)),
    "const": encode_mask(np.ones((4, 5), bool)),
}


@pytest.mark.parametrize("name", SMALL_BLOBS)
def test_every_truncation_raises(name):
    blob = SMALL_BLOBS[name]
    for cut in range(len(blob)):
        _expect_artifact_error(blob[:cut])


@pytest.mark.parametrize("name", SMALL_BLOBS)
def test_every_flipped_byte_raises(name):
    blob = SMALL_BLOBS[name]
    for i in range(len(blob)):
        for flip in (0x01, 0x80, 0xFF):
            bad = bytearray(blob)
            bad[i] ^= flip
            _expect_artifact_error(bytes(bad))


def test_sampled_corruption_of_a_large_blob():
    blob = encode_mask(_random_mask((400_000,), 0.05, 5))
    rng = np.random.default_rng(0)
    for cut in rng.integers(0, len(blob), 40):
        with pytest.raises(ArtifactError):
            decode_mask(blob[:cut])
    for i in rng.integers(0, len(blob), 40):
        bad = bytearray(blob)
        bad[i] ^= int(rng.integers(1, 256))
        with pytest.raises(ArtifactError):
            decode_mask(bytes(bad))
    with pytest.raises(ArtifactError):
        decode_mask(blob + b"\0")


def test_wrong_magic_and_version():
    blob = SMALL_BLOBS["rice-zeros"]
    with pytest.raises(ArtifactError, match="magic"):
        decode_mask(b"XMSK" + blob[4:])
    with pytest.raises(ArtifactError, match="version"):
        decode_mask(_refresh_crc(blob[:4] + bytes([2]) + blob[5:]))
    _expect_artifact_error(b"")
    _expect_artifact_error(b"RMSK")


@SETTINGS
@given(garbage=st.binary(max_size=200))
def test_random_garbage_raises(garbage):
    _expect_artifact_error(garbage)
    _expect_artifact_error(b"RMSK\x01" + garbage)


@SETTINGS
@given(
    name=st.sampled_from(sorted(SMALL_BLOBS)),
    edits=st.lists(st.tuples(st.integers(4, 10_000), st.integers(1, 255)), min_size=1, max_size=3),
)
def test_crafted_blobs_with_valid_crc_never_crash(name, edits):
    """Edits with a recomputed CRC must give ArtifactError or a mask matching the header."""
    bad = bytearray(SMALL_BLOBS[name])
    for pos, flip in edits:
        i = 4 + pos % (len(bad) - 4)
        if not 8 <= i < 12:
            bad[i] ^= flip
    blob = _refresh_crc(bad)
    try:
        out = decode_mask(blob)
    except ArtifactError:
        return
    stats = mask_stats(blob)
    assert out.dtype == np.bool_ and out.shape == stats.shape
    assert int((~out).sum()) == stats.zeros
    np.testing.assert_array_equal(decode_zero_indices(blob)[1], np.flatnonzero(~out))


def _crafted(method: int, shape, zeros: int, k: int = 0, extra: list[int] = (), payload=b"") -> bytes:
    def varint(v):
        out = bytearray()
        while v > 0x7F:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        return bytes(out + bytes([v]))

    body = b"".join(varint(v) for v in [zeros, *extra, *shape]) + payload
    return _refresh_crc(b"RMSK" + bytes([1, method, len(shape), k]) + b"\0" * 4 + body)


@pytest.mark.parametrize(
    "blob",
    [
        _crafted(0, (2**40,), 0),  # absurd size, constant
        _crafted(0, (2**20, 2**20), 0),  # absurd product
        _crafted(0, (10,), 3),  # const-ones with zeros
        _crafted(1, (10,), 3),  # const-zeros with ones
        _crafted(2, (10,), 0, payload=b"\xff\xff"),  # packbits of a constant mask
        _crafted(3, (10,), 3, k=60, extra=[1], payload=b"\xff"),  # k out of range
        _crafted(3, (10,), 1, k=0, extra=[2**62], payload=b""),  # huge unary length
        _crafted(3, (10,), 1, k=0, extra=[1], payload=b"\x01\x00"),  # trailing byte
        _crafted(7, (10,), 1),  # unknown method
        _crafted(0, (1,) * 65, 0),  # too many dims
        b"RMSK\x01\x00\x01\x00" + b"\0" * 4 + b"\xff" * 12,  # unterminated varint (bad CRC too)
        _crafted(0, (), 0)[:-1],  # header cut inside the varints
    ],
)
def test_crafted_headers_raise(blob):
    _expect_artifact_error(blob)


@pytest.mark.parametrize(
    "blob",
    [
        _crafted(2, (10,), 3, payload=b"\xff\xff"),  # packbits count mismatch
        _crafted(3, (10,), 3, k=0, extra=[1], payload=b"\x00"),  # no codes in unary stream
        _crafted(3, (10,), 2, k=0, extra=[1], payload=b"\x01"),  # too few codes
        _crafted(3, (10,), 1, k=0, extra=[2], payload=b"\x00\x01"),  # gap beyond the mask
        _crafted(3, (10,), 1, k=2, extra=[1], payload=b"\x20\xc0"),  # remainder beyond the mask
    ],
)
def test_crafted_payloads_raise_on_decode(blob):
    _expect_artifact_error(blob, stats=False)
    assert mask_stats(blob).size == 10


def test_hand_made_rice_blob_decodes():
    """rice-ones, k=0, one code: unary 00000001 -> gap 7 -> the only True is at index 7."""
    blob = _crafted(4, (10,), 9, k=0, extra=[1], payload=b"\x01")
    np.testing.assert_array_equal(decode_mask(blob), np.arange(10) == 7)
    np.testing.assert_array_equal(decode_zero_indices(blob)[1], [0, 1, 2, 3, 4, 5, 6, 8, 9])


@pytest.mark.parametrize("log2_gap", [2, 3, 8, 9, 12, 16, 17, 19])
def test_rice_parameters_across_byte_widths(log2_gap):
    """Zero rates 2**-j exercise Rice parameters near j, covering 1-, 2- and 4-byte remainders."""
    _check_round_trip(_random_mask((1 << 20,), 2.0**-log2_gap, log2_gap))


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7, 8, 9, 13, 16, 17, 31, 40])
@pytest.mark.parametrize("m", [1, 7, 8, 9, 1001])
def test_remainder_streams_of_every_width_read_back(k, m):
    """k-bit MSB-first remainders as the encoder packs them (one 64-bit read per 8 values for k <= 8,
    strided per phase above) read back exactly, whatever m is modulo 8."""
    from rmt_deploy.artifacts.masks import _remainders

    values = np.random.default_rng(k * 1000 + m).integers(0, 1 << k, m)
    bits = np.unpackbits(values.astype(">u8").view(np.uint8).reshape(-1, 8), axis=1)[:, 64 - k:]
    stream = np.packbits(bits).tobytes()
    np.testing.assert_array_equal(_remainders(memoryview(stream), m, k), values)


def test_header_only_stats_skip_the_crc_but_decoding_still_checks_it():
    """LazyZeros sizes a task from headers alone; the flipped payload bit is caught when it is decoded."""
    from rmt_deploy.runtime.task_reader import LazyZeros

    mask = np.random.default_rng(3).random((64, 48)) >= 0.05
    blob = bytearray(encode_mask(mask))
    blob[-1] ^= 0x01
    stats = mask_stats(bytes(blob), check_crc=False)
    assert stats.zeros == int((~mask).sum()) and stats.shape == mask.shape
    with pytest.raises(ArtifactError, match="CRC32 mismatch"):
        mask_stats(bytes(blob))
    lazy = LazyZeros({"w": bytes(blob)}, {"w": decode_mask}, {"w": "w"}, {"w": 12})
    assert lazy.nbytes == stats.zeros * 12
    with pytest.raises(ArtifactError, match="CRC32 mismatch"):
        lazy["w"]
