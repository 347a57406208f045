"""The SecAgg pseudorandom generator: a 32-byte seed -> a uint32 mask vector.

Definition (normative; other implementations must match it bit for bit):

    mask(seed, length)[i] = little-endian uint32 of bytes [4i, 4i + 4) of the
    AES-256-CTR keystream with key = seed (all 32 bytes) and initial counter block 0^128,
    the counter block incremented as one 128-bit big-endian integer (NIST SP 800-38A).

That is AES-256-CTR encryption of zero bytes. The keystream of one key never repeats a
counter block for fewer than 2^132 bytes of output, and each seed is used for one mask only
(SecAgg derives fresh seeds per round), so the zero nonce is safe. numpy's generators are
never used here: they are not cryptographic and their streams may change between versions.

The hot path is `MaskAccumulator`: a client adds its self mask and +/- one mask per
neighbour; the server removes them again. Keystream is produced chunk by chunk into a reused
scratch buffer with `encryptor.update_into` (no allocation per chunk) and added in place with
numpy (uint32 arithmetic wraps, which is exactly addition mod 2^32). With several seeds,
`apply` walks the vector once and applies every seed to a chunk while that chunk of the
accumulator is still in cache.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from ._util import require_bytes
from .errors import CryptoError

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "SEED_BYTES",
    "MaskAccumulator",
    "apply_masks",
    "expand_mask",
    "keystream",
]

SEED_BYTES = 32
# Measured (CPU time) on the 2-core Xeon this project targets, 8 seeds over 1M words: masking
# costs 1.21-1.26x the bare keystream with 128-512 KiB chunks, 1.28-1.34x with 1 MiB and
# 1.30x with 64 KiB: 256 KiB keeps the zero input, the scratch and the accumulator slice in
# L2 while amortising the per-call overhead. The scratch is reused for the whole run.
DEFAULT_CHUNK_BYTES = 256 * 1024
_ZERO_COUNTER = bytes(16)
# update_into wants room for one block beyond the input (a contract of the API).
_SLACK = 16
_BIG_ENDIAN = sys.byteorder == "big"


def _encryptor(seed: bytes, initial_counter: bytes = _ZERO_COUNTER) -> CipherContext:
    seed = require_bytes(seed, SEED_BYTES, "seed")
    initial_counter = require_bytes(initial_counter, 16, "initial_counter")
    return Cipher(algorithms.AES(seed), modes.CTR(initial_counter)).encryptor()


def keystream(seed: bytes, nbytes: int, *, initial_counter: bytes = _ZERO_COUNTER) -> bytes:
    """`nbytes` of the AES-256-CTR keystream of `seed` from the given 128-bit counter block.

    The mask is `keystream(seed, 4 * length)` read as little-endian uint32; the counter
    argument exists so the construction can be checked against NIST SP 800-38A vectors.
    """
    nbytes = _check_length(nbytes)
    return _encryptor(seed, initial_counter).update(bytes(nbytes))


def _check_length(length: int) -> int:
    if isinstance(length, bool) or not isinstance(length, int | np.integer):
        raise CryptoError(f"length: expected int, got {type(length).__name__}")
    length = int(length)
    if length < 0:
        raise CryptoError(f"length: {length} is negative")
    return length


def _check_chunk(chunk_bytes: int) -> int:
    if chunk_bytes < 64 or chunk_bytes % 16:
        raise CryptoError(f"chunk_bytes: {chunk_bytes} must be a multiple of 16, >= 64")
    return chunk_bytes


class _Scratch:
    """A zero input and an output buffer of one chunk, reused for every update_into call."""

    __slots__ = ("chunk_bytes", "out", "words", "zeros")

    def __init__(self, chunk_bytes: int) -> None:
        self.chunk_bytes = _check_chunk(chunk_bytes)
        self.zeros = memoryview(bytes(chunk_bytes))
        self.out = bytearray(chunk_bytes + _SLACK)
        self.words = np.frombuffer(self.out, dtype="<u4", count=chunk_bytes // 4)


def expand_mask(seed: bytes, length: int, *, out: np.ndarray | None = None) -> np.ndarray:
    """The mask of `length` uint32 words for `seed` (see the module docstring).

    `out`, if given, must be a C-contiguous uint32 array of exactly `length` elements; it is
    overwritten and returned.
    """
    length = _check_length(length)
    enc = _encryptor(seed)
    if out is None:
        out = np.empty(length, dtype=np.uint32)
    elif (
        not isinstance(out, np.ndarray)
        or out.dtype != np.uint32
        or out.shape != (length,)
        or not out.flags.c_contiguous
    ):
        raise CryptoError(f"out: need a C-contiguous uint32 array of shape ({length},)")
    elif not out.flags.writeable:
        raise CryptoError("out: array is read-only")
    if length == 0:
        return out
    raw = memoryview(out.data).cast("B")
    total = 4 * length
    chunk = DEFAULT_CHUNK_BYTES
    zeros = memoryview(bytes(min(chunk, total)))
    pos = 0
    # Write the keystream straight into `out` while the slack that update_into demands fits
    # inside the array; the tail goes through a small bounce buffer.
    while pos < total and total - pos > _SLACK:
        n = min(chunk, total - pos - _SLACK)
        enc.update_into(zeros[:n], raw[pos : pos + n + _SLACK])
        pos += n
    if pos < total:
        tail = bytearray(total - pos + _SLACK)
        enc.update_into(zeros[: total - pos], tail)
        raw[pos:] = tail[: total - pos]
    if _BIG_ENDIAN:
        out.byteswap(inplace=True)
    return out


class MaskAccumulator:
    """A uint32 vector to which masks are added or subtracted, mod 2^32, in place.

    `value` is the live array (not a copy): read it when done, copy it if you keep mutating.
    Not thread-safe: each accumulator owns its scratch buffer.
    """

    __slots__ = ("_scratch", "_value")

    def __init__(
        self,
        length: int,
        *,
        initial: np.ndarray | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        length = _check_length(length)
        if initial is None:
            self._value = np.zeros(length, dtype=np.uint32)
        else:
            arr = np.asarray(initial)
            if arr.dtype != np.uint32 or arr.shape != (length,):
                raise CryptoError(
                    f"initial: need uint32 of shape ({length},), got {arr.dtype} {arr.shape}"
                )
            self._value = arr.copy()
        self._scratch = _Scratch(chunk_bytes)

    @property
    def value(self) -> np.ndarray:
        return self._value

    def __len__(self) -> int:
        return self._value.size

    def add(self, seed: bytes) -> None:
        """value += mask(seed)  (mod 2^32)."""
        self.apply(add=(seed,))

    def subtract(self, seed: bytes) -> None:
        """value -= mask(seed)  (mod 2^32)."""
        self.apply(subtract=(seed,))

    def apply(self, add: Iterable[bytes] = (), subtract: Iterable[bytes] = ()) -> None:
        """value += sum(mask(s) for s in add) - sum(mask(s) for s in subtract), mod 2^32.

        One pass over the vector: every seed's keystream is applied to a chunk before moving
        on, so the accumulator chunk stays in cache however many seeds there are.
        """
        # Validate every seed before touching the value: nothing half-applied on bad input.
        plus = [_encryptor(s) for s in add]
        minus = [_encryptor(s) for s in subtract]
        if not plus and not minus:
            return
        value = self._value
        scratch = self._scratch
        step = scratch.chunk_bytes // 4
        out = scratch.out
        np_add, np_subtract = np.add, np.subtract
        plus_into = [enc.update_into for enc in plus]
        minus_into = [enc.update_into for enc in minus]
        for start in range(0, value.size, step):
            part = value[start : start + step]
            n = part.size
            zeros = scratch.zeros if n == step else scratch.zeros[: 4 * n]
            words = scratch.words if n == step else scratch.words[:n]
            for update_into in plus_into:
                update_into(zeros, out)
                np_add(part, words, out=part)
            for update_into in minus_into:
                update_into(zeros, out)
                np_subtract(part, words, out=part)

    def add_vector(self, vector: np.ndarray) -> None:
        """value += vector (mod 2^32), e.g. the client's quantised input."""
        self._value += self._check_vector(vector)

    def subtract_vector(self, vector: np.ndarray) -> None:
        """value -= vector (mod 2^32)."""
        self._value -= self._check_vector(vector)

    def _check_vector(self, vector: np.ndarray) -> np.ndarray:
        arr = np.asarray(vector)
        if arr.dtype != np.uint32 or arr.shape != self._value.shape:
            raise CryptoError(
                f"vector: need uint32 of shape {self._value.shape}, got {arr.dtype} {arr.shape}"
            )
        return arr


def apply_masks(
    vector: np.ndarray, add: Sequence[bytes] = (), subtract: Sequence[bytes] = ()
) -> np.ndarray:
    """A new array: vector + masks(add) - masks(subtract), mod 2^32."""
    acc = MaskAccumulator(np.asarray(vector).size, initial=vector)
    acc.apply(add=add, subtract=subtract)
    return acc.value
