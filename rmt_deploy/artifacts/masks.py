"""Compact, self-describing codec for binary weight masks (numpy only).

A mask is a bool array (True = weight kept). Each blob picks the smallest of:
constant (no payload), `np.packbits`, or Golomb-Rice coding of the gaps
between the positions of the minority symbol, with the unary parts and the
k-bit remainders in two separate bit streams so decoding is vectorised.

Blob layout (integers little-endian, varints are unsigned LEB128):

    offset size  field
    0      4     magic b"RMSK"
    4      1     format version (1)
    5      1     method id: 0 const-ones, 1 const-zeros, 2 packbits,
                 3 rice-zeros (codes False positions), 4 rice-ones (True positions)
    6      1     ndim (<= 64)
    7      1     Rice parameter k (0 unless rice)
    8      4     CRC32 of bytes 4..8 followed by bytes 12..end
    12     ...   varints: zeros (count of False), [unary stream bytes: rice only],
                 then the ndim dimensions
    ...    ...   payload: packbits bytes, or rice unary stream + remainder stream

Rice streams: gap_i = pos_i - pos_{i-1} - 1 (pos_{-1} = -1); q = gap >> k is
written as q 0-bits then a 1-bit; r = gap & (2**k - 1) as k bits MSB first.
Both streams are packed MSB first (`np.packbits` order), zero padded.
The header is 12 + ~10 + ndim..5*ndim bytes: at most 64 bytes beyond packbits for ndim <= 32.
"""
from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from rmt_deploy.errors import ArtifactError, InputError

__all__ = [
    "MaskStats", "encode_mask", "decode_mask", "decode_zero_indices",
    "entropy_bound_bytes", "mask_stats",
]

_MAGIC = b"RMSK"
_VERSION = 1
_FIXED = struct.Struct("<4sBBBBI")
_ONES, _ZEROS, _PACKBITS, _RICE_ZEROS, _RICE_ONES = range(5)
_RICE = (_RICE_ZEROS, _RICE_ONES)
METHODS = ("const-ones", "const-zeros", "packbits", "rice-zeros", "rice-ones")
MAX_SIZE = 1 << 32  # elements per mask; far above any real tensor, bounds allocations
MAX_NDIM = 32  # keeps the header within 64 bytes of packbits
MAX_K = 40


@dataclass(frozen=True)
class MaskStats:
    """Summary of an encoded mask, read without decoding the payload."""

    shape: tuple[int, ...]
    size: int
    zeros: int
    method: str
    nbytes: int


@dataclass(frozen=True)
class _Header:
    method: int
    k: int
    shape: tuple[int, ...]
    size: int
    zeros: int
    unary_nbytes: int
    payload: memoryview
    nbytes: int

    @property
    def minority(self) -> int:
        """Number of coded positions for the rice methods."""
        return self.zeros if self.method == _RICE_ZEROS else self.size - self.zeros


# ---------------------------------------------------------------- encoding


def _check_bool(keep: np.ndarray) -> np.ndarray:
    if isinstance(keep, np.generic):
        keep = np.asarray(keep)
    if not isinstance(keep, np.ndarray) or keep.dtype != np.bool_:
        kind = getattr(keep, "dtype", type(keep).__name__)
        raise InputError(f"mask must be a numpy bool array, got {kind}; convert with arr.astype(bool)")
    if keep.ndim > MAX_NDIM or keep.size > MAX_SIZE or any(d > MAX_SIZE for d in keep.shape):
        raise InputError(f"mask shape {keep.shape} is too large (at most {MAX_SIZE} elements)")
    return keep


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _blob(method: int, shape: tuple[int, ...], zeros: int, k: int = 0,
          unary: bytes = b"", payload: bytes = b"") -> bytes:
    fields = [zeros, *([len(unary)] if method in _RICE else []), *shape]
    body = b"".join(map(_varint, fields)) + unary + payload
    head = bytes((_VERSION, method, len(shape), k))
    crc = zlib.crc32(body, zlib.crc32(head))
    return _MAGIC + head + struct.pack("<I", crc) + body


def _rice_k(gaps: np.ndarray) -> int:
    """Optimal Rice parameter: cost(k) is convex in k, so descend from log2(mean)."""
    m = gaps.size
    cost = lambda k: m * (k + 1) + int(np.right_shift(gaps, k).sum())  # noqa: E731
    k = max(0, int(gaps.sum() // m).bit_length() - 1)
    best = cost(k)
    step = -1 if k > 0 and cost(k - 1) < best else 1
    while 0 <= k + step <= MAX_K and (c := cost(k + step)) < best:
        k, best = k + step, c
    return k


def _rice_encode(pos: np.ndarray) -> tuple[int, bytes, bytes]:
    gaps = np.diff(pos, prepend=-1)
    gaps -= 1
    k = _rice_k(gaps)
    ends = np.cumsum(np.right_shift(gaps, k) + 1)
    ends -= 1
    unary = np.zeros(int(ends[-1]) + 1, np.uint8)
    unary[ends] = 1
    rem = b""
    if k:
        nbytes = 1 << max(0, (k - 1).bit_length() - 3)  # 1, 2, 4 or 8 bytes per value
        r = (gaps & ((1 << k) - 1)).astype(f">u{nbytes}")
        bits = np.unpackbits(r.view(np.uint8).reshape(-1, nbytes), axis=1)
        rem = np.packbits(bits[:, 8 * nbytes - k:]).tobytes()
    return k, np.packbits(unary).tobytes(), rem


def encode_mask(keep: np.ndarray) -> bytes:
    """Encode a bool mask of any shape into the smallest self-describing blob."""
    keep = _check_bool(keep)
    flat = keep.reshape(-1)
    n = flat.size
    zeros = n - int(np.count_nonzero(flat))
    if zeros == 0 or zeros == n:
        return _blob(_ONES if zeros == 0 else _ZEROS, keep.shape, zeros)
    packed = np.packbits(flat).tobytes()
    method = _RICE_ZEROS if zeros <= n - zeros else _RICE_ONES
    k, unary, rem = _rice_encode(np.flatnonzero(~flat if method == _RICE_ZEROS else flat))
    if len(unary) + len(rem) + len(_varint(len(unary))) < len(packed):
        return _blob(method, keep.shape, zeros, k, unary, rem)
    return _blob(_PACKBITS, keep.shape, zeros, payload=packed)


def entropy_bound_bytes(keep: np.ndarray) -> float:
    """N * H(p) / 8 bytes, with p the fraction of False entries (H in bits)."""
    keep = _check_bool(keep)
    return entropy_bound_for(keep.size, keep.size - int(np.count_nonzero(keep)))


def entropy_bound_for(size: int, zeros: int) -> float:
    """The Shannon bound in bytes for `size` i.i.d. entries of which `zeros` are False."""
    p = zeros / size if size else 0.0
    if p in (0.0, 1.0):
        return 0.0
    return size * -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) / 8


# ---------------------------------------------------------------- decoding


def _fail(reason: str) -> ArtifactError:
    return ArtifactError(f"invalid mask blob: {reason}")


def _read_varint(mv: memoryview, off: int) -> tuple[int, int]:
    value = 0
    for i in range(10):
        if off + i >= len(mv):
            raise _fail("header is truncated")
        byte = mv[off + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, off + i + 1
    raise _fail("malformed varint in header")


def _expected_payload(method: int, k: int, n: int, zeros: int, unary_nbytes: int) -> int:
    if method == _ONES and zeros == 0 or method == _ZEROS and zeros == n:
        return 0
    if method == _PACKBITS and 0 < zeros < n:
        return (n + 7) // 8
    if method not in _RICE or not 0 < zeros < n:
        raise _fail(f"method {METHODS[method]} is inconsistent with {zeros} zeros of {n}")
    m = zeros if method == _RICE_ZEROS else n - zeros
    if k > MAX_K or m * ((1 << k) - 1) > 2 * n or unary_nbytes < (m + 7) // 8:
        raise _fail(f"rice parameters out of range (k={k}, count={m}, unary={unary_nbytes} bytes)")
    return unary_nbytes + (m * k + 7) // 8


def _parse(blob: bytes, check_crc: bool = True) -> _Header:
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise _fail(f"expected bytes, got {type(blob).__name__}")
    mv = memoryview(blob).cast("B")
    if len(mv) < _FIXED.size:
        raise _fail(f"{len(mv)} bytes is shorter than the {_FIXED.size}-byte header (truncated?)")
    magic, version, method, ndim, k, crc = _FIXED.unpack_from(mv)
    if magic != _MAGIC:
        raise _fail(f"bad magic {bytes(magic)!r} (expected {_MAGIC!r}); not a mask blob")
    if version != _VERSION:
        raise _fail(f"unsupported format version {version} (this build reads {_VERSION})")
    actual = zlib.crc32(mv[_FIXED.size:], zlib.crc32(mv[4:8])) if check_crc else crc
    if actual != crc:
        raise _fail(f"CRC32 mismatch (stored {crc:08x}, computed {actual:08x}): corrupted or truncated")
    if method >= len(METHODS) or ndim > MAX_NDIM:
        raise _fail(f"unknown method id {method} or ndim {ndim}")
    zeros, off = _read_varint(mv, _FIXED.size)
    unary_nbytes = 0
    if method in _RICE:
        unary_nbytes, off = _read_varint(mv, off)
    shape = []
    for _ in range(ndim):
        dim, off = _read_varint(mv, off)
        shape.append(dim)
    n = math.prod(shape)
    if n > MAX_SIZE or any(d > MAX_SIZE for d in shape) or zeros > n:
        raise _fail(f"shape {tuple(shape)} / zero count {zeros} out of range")
    expected = _expected_payload(method, k, n, zeros, unary_nbytes)
    if len(mv) - off != expected:
        raise _fail(f"payload is {len(mv) - off} bytes, header says {expected}")
    return _Header(method, k, tuple(shape), n, zeros, unary_nbytes, mv[off:], len(mv))


def _remainders(stream: memoryview, m: int, k: int) -> np.ndarray:
    """Read m k-bit MSB-first values. Values 8g+j start at byte g*k + (j*k >> 3), so for
    each phase j a strided big-endian uint64 view over the groups g holds them."""
    groups = (m + 7) // 8
    padded = np.zeros(groups * k + 8, np.uint8)
    padded[: len(stream)] = np.frombuffer(stream, np.uint8)
    if k <= 8:  # a group's 8 values are the top 8k bits of the word at its first byte: one read per group
        words = np.ndarray((groups,), ">u8", padded, 0, (k,)).astype(np.int64)
        shifts = np.arange(64 - k, 63 - 8 * k, -k, dtype=np.int64)
        values = (words[None, :] >> shifts[:, None]).T.copy()  # the long axis innermost, so the shifts stream
        values &= (1 << k) - 1
        return values.reshape(-1)[:m]
    out = np.empty((groups, 8), np.int64)
    for j in range(8):
        words = np.ndarray((groups,), ">u8", padded, (j * k) >> 3, (k,))
        out[:, j] = (words << np.uint64((j * k) & 7)) >> np.uint64(64 - k)
    return out.reshape(-1)[:m]


def _rice_positions(h: _Header) -> np.ndarray:
    m, k = h.minority, h.k
    bits = np.unpackbits(np.frombuffer(h.payload[: h.unary_nbytes], np.uint8))
    ends = np.flatnonzero(bits.view(np.bool_))
    if ends.size != m or int(ends[-1]) // 8 != h.unary_nbytes - 1:
        raise _fail(f"unary stream holds {ends.size} codes, header says {m}")
    if int(ends[-1]) + 1 - m > h.size >> k:
        raise _fail("unary stream codes gaps beyond the mask size")
    # pos_i = ((ends_i - i) << k) + sum_{j<=i} r_j + i, since ends_i - i = sum_{j<=i} q_j;
    # computed in place as ((ends + 1) << k) + cumsum(r + 1 - 2**k) - 1.
    pos = ends
    if k:
        pos += 1
        pos <<= k
        rem = _remainders(h.payload[h.unary_nbytes:], m, k)
        rem += 1 - (1 << k)
        pos += np.cumsum(rem, out=rem)
        pos -= 1
    if int(pos[-1]) >= h.size:
        raise _fail(f"position {int(pos[-1])} is outside a mask of {h.size} elements")
    return pos


def _dense(h: _Header) -> np.ndarray:
    try:
        pos = _rice_positions(h) if h.method in _RICE else None  # validate before allocating
        if h.method == _PACKBITS:
            bits = np.unpackbits(np.frombuffer(h.payload, np.uint8), count=h.size).view(np.bool_)
            if h.size - int(np.count_nonzero(bits)) != h.zeros:
                raise _fail("packed bits disagree with the zero count in the header")
            return bits
        fill = h.method in (_ONES, _RICE_ZEROS)
        out = np.full(h.size, fill, np.bool_)
    except MemoryError:
        raise _fail(f"a mask of {h.size} elements does not fit in memory") from None
    if pos is not None:
        out[pos] = not fill
    return out


def _parse_expecting(blob: bytes, expected_shape: tuple[int, ...] | None) -> _Header:
    """Parse the header; with `expected_shape`, refuse any other shape before anything is allocated."""
    h = _parse(blob)
    if expected_shape is not None and tuple(h.shape) != tuple(int(d) for d in expected_shape):
        raise _fail(f"declares shape {list(h.shape)}, the tensor it masks is {list(expected_shape)}")
    return h


def decode_mask(blob: bytes, expected_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Decode a blob from `encode_mask` into a bool array of the original shape (which must be
    `expected_shape` when given: untrusted blobs are sized by the tensor, not by themselves)."""
    h = _parse_expecting(blob, expected_shape)
    return _dense(h).reshape(h.shape)


def decode_zero_indices(blob: bytes, expected_shape: tuple[int, ...] | None = None
                        ) -> tuple[tuple[int, ...], np.ndarray]:
    """Return (shape, sorted flat int64 indices of the False entries) without a dense mask
    when the zeros are the coded symbol (the common case). `expected_shape` as for decode_mask."""
    h = _parse_expecting(blob, expected_shape)
    if h.method == _ONES:
        return h.shape, np.zeros(0, np.int64)
    try:
        if h.method == _ZEROS:
            return h.shape, np.arange(h.size, dtype=np.int64)
        if h.method == _RICE_ZEROS:
            return h.shape, _rice_positions(h)
        return h.shape, np.flatnonzero(~_dense(h)).astype(np.int64, copy=False)
    except MemoryError:
        raise _fail(f"the zero positions of a mask of {h.size} elements do not fit in memory") from None


def mask_stats(blob: bytes, check_crc: bool = True) -> MaskStats:
    """Shape, size, zero count, method and encoded size from the blob's header (CRC-checked unless
    `check_crc=False`, for a caller that decodes the blob later, which checks it then)."""
    h = _parse(blob, check_crc)
    return MaskStats(h.shape, h.size, h.zeros, METHODS[h.method], h.nbytes)
