"""Shamir t-of-n secret sharing of 32-byte secrets, vectorised with numpy.

Field and encoding
------------------
We work in GF(p) with the Mersenne prime p = 2^31 - 1. A 32-byte secret is read as a
256-bit little-endian integer and cut into L = 9 limbs of 30 bits (the last one holds the
top 16 bits). Every limb is < 2^30 < p, so the map secret -> limbs is injective, and each
limb is shared with its own independent, uniformly random polynomial of degree t - 1 over
GF(p). A share for x is the 9 polynomial values at x, 9 little-endian uint32 = 36 bytes.

Why it is correct and why it hides the secret: for each limb this is textbook Shamir over a
prime field (x in 1..p-1, distinct), so any t shares determine the limb by Lagrange
interpolation at 0, and any t - 1 shares are uniformly distributed whatever the limb is
(the t - 1 random coefficients are in bijection with the t - 1 share values). Limbs use
independent coefficients, so that holds for the whole vector of limbs, i.e. the secret.

Why this field: every product of two field elements is < 2^62, so numpy int64 arithmetic
needs no big integers and no overflow tricks: multiply, reduce mod p, and a sum of t reduced
terms stays below 2^63 for any t < 2^32. That makes `split_many` and `combine_many` plain
array expressions over (secrets x shares x limbs), which is what the SecAgg server needs when
it rebuilds thousands of keys at once. The Lagrange coefficients at 0 depend only on the set
of x-coordinates, so `combine_many` computes them once per distinct set.

Integrity: reconstruction from shares unrelated to one sharing (random field elements in
every limb) lands inside the encoding (30 bits per limb, 16 in the last) with probability
about 2^-23 and is then refused with CryptoError. That is not tamper detection: a change to
one limb of one share alters one limb of the result and passes about half the time. Shares
must travel authenticated (SecAgg sends them AEAD-encrypted); with more than t shares,
`verify=True` also checks that every extra share lies on the interpolated polynomial.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from ._util import require_bytes
from .errors import CryptoError

__all__ = [
    "LIMBS",
    "LIMB_BITS",
    "PRIME",
    "SECRET_BYTES",
    "SHARE_BYTES",
    "combine",
    "combine_many",
    "lagrange_coefficients",
    "split",
    "split_many",
]

PRIME = 2**31 - 1
SECRET_BYTES = 32
LIMB_BITS = 30
LIMBS = -(-SECRET_BYTES * 8 // LIMB_BITS)  # 9
SHARE_BYTES = 4 * LIMBS  # 36
_PAD_BITS = LIMBS * LIMB_BITS - SECRET_BYTES * 8  # 14 bits that must be zero on decode
_LIMB_WEIGHTS = (1 << np.arange(LIMB_BITS, dtype=np.int64)).astype(np.int64)

Randbytes = Callable[[int], bytes]


# -- encoding ---------------------------------------------------------------------------------


def _secrets_to_limbs(secrets: Sequence[bytes]) -> np.ndarray:
    """(m, 32) bytes -> (m, LIMBS) int64 limbs, each < 2^30."""
    raw = b"".join(require_bytes(s, SECRET_BYTES, f"secrets[{i}]") for i, s in enumerate(secrets))
    arr = np.frombuffer(raw, dtype=np.uint8).reshape(len(secrets), SECRET_BYTES)
    bits = np.unpackbits(arr, axis=1, bitorder="little")
    bits = np.concatenate([bits, np.zeros((len(secrets), _PAD_BITS), dtype=np.uint8)], axis=1)
    return bits.reshape(len(secrets), LIMBS, LIMB_BITS).astype(np.int64) @ _LIMB_WEIGHTS


def _limbs_to_secrets(limbs: np.ndarray) -> list[bytes]:
    """(m, LIMBS) field elements -> 32-byte secrets; CryptoError if a limb is out of range."""
    bits = (limbs[:, :, None] >> np.arange(LIMB_BITS, dtype=np.int64)) & 1
    bits = bits.reshape(limbs.shape[0], LIMBS * LIMB_BITS).astype(np.uint8)
    bad = (limbs >= (1 << LIMB_BITS)).any(axis=1) | bits[:, SECRET_BYTES * 8 :].any(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise CryptoError(
            f"shares: secret {first} reconstructs to a value outside the encoding "
            "(shares tampered, mixed between secrets, or fewer than threshold are genuine)"
        )
    packed = np.packbits(bits[:, : SECRET_BYTES * 8], axis=1, bitorder="little")
    return [row.tobytes() for row in packed]


# -- randomness -------------------------------------------------------------------------------


def _random_field_elements(shape: tuple[int, ...], randbytes: Randbytes) -> np.ndarray:
    """Uniform elements of GF(p): 31 random bits each, rejecting the single value p."""
    count = int(np.prod(shape))
    out = np.empty(count, dtype=np.int64)
    todo = np.arange(count)
    while todo.size:
        raw = require_bytes(randbytes(4 * todo.size), 4 * todo.size, "randbytes")
        vals = np.frombuffer(raw, dtype="<u4").astype(np.int64) & PRIME
        out[todo] = vals
        todo = todo[vals == PRIME]  # probability 2^-31 per element
    return out.reshape(shape)


# -- validation -------------------------------------------------------------------------------


def _check_threshold(threshold: int, n: int) -> int:
    if isinstance(threshold, bool) or not isinstance(threshold, int | np.integer):
        raise CryptoError(f"threshold: expected int, got {type(threshold).__name__}")
    if not 1 <= threshold <= n:
        raise CryptoError(f"threshold: {threshold} must be in 1..{n} (number of shares)")
    return int(threshold)


def _check_xs(xs: Sequence[int] | Iterable[int]) -> np.ndarray:
    """xs as int64, or CryptoError unless they are distinct ints in 1..p-1."""
    items = list(xs)
    arr = np.array(items)
    if arr.dtype.kind not in "iu" or arr.ndim != 1 or any(type(x) is bool for x in items):
        # The slow path only runs to name the offender (bools, floats, huge ints, ...).
        for x in items:
            if isinstance(x, bool) or not isinstance(x, int | np.integer):
                raise CryptoError(f"xs: {x!r} is not an int")
            if not 1 <= int(x) < PRIME:
                raise CryptoError(f"xs: {x} outside 1..{PRIME - 1}")
        arr = np.array([int(x) for x in items], dtype=np.int64)
    arr = arr.astype(np.int64, copy=False) if arr.dtype.kind == "i" else arr
    if arr.dtype.kind == "u":
        if (arr >= PRIME).any():
            raise CryptoError(f"xs: values outside 1..{PRIME - 1}")
        arr = arr.astype(np.int64)
    out_of_range = (arr < 1) | (arr >= PRIME)
    if out_of_range.any():
        raise CryptoError(
            f"xs: {items[int(np.flatnonzero(out_of_range)[0])]} outside 1..{PRIME - 1}"
        )
    if np.unique(arr).size != arr.size:
        raise CryptoError("xs: x-coordinates must be distinct")
    return arr


# -- Lagrange ---------------------------------------------------------------------------------


def _mulmod_pow(base: np.ndarray, exponent: int) -> np.ndarray:
    """base ** exponent mod p, elementwise, by square-and-multiply (operands < 2^31)."""
    result = np.ones_like(base)
    square = base % PRIME
    while exponent:
        if exponent & 1:
            result = result * square % PRIME
        square = square * square % PRIME
        exponent >>= 1
    return result


def _lagrange_rows(xs: np.ndarray, at: int) -> np.ndarray:
    """Lagrange coefficients at `at` for every row of distinct x-coordinates xs (G, t).

    lambda[g, j] = prod_{m != j} (at - x[g, m]) / (x[g, j] - x[g, m])  mod p. `at` must not
    be one of the row's xs (true for 0 and for a share outside the interpolated set), so the
    numerator is Q / (at - x[g, j]) with Q the full product: one loop over m of whole-array
    operations builds the denominators, and one vectorised Fermat exponentiation inverts
    everything at once, so thousands of distinct share sets cost milliseconds.
    """
    g, t = xs.shape
    diff_at = (at - xs) % PRIME  # (G, t), nonzero because at is not in the row
    if (diff_at == 0).any():
        raise CryptoError(f"lagrange: evaluation point {at} is one of the x-coordinates")
    full = np.ones(g, dtype=np.int64)
    den = diff_at.copy()  # fold (at - x_j) in, so one inversion covers both factors
    for m in range(t):
        col = xs[:, m : m + 1]
        full = full * diff_at[:, m] % PRIME
        factor = (xs - col) % PRIME
        factor[:, m] = 1
        den = den * factor % PRIME
    coefficients: np.ndarray = full[:, None] * _mulmod_pow(den, PRIME - 2) % PRIME
    return coefficients


def lagrange_coefficients(xs: Sequence[int], at: int = 0) -> np.ndarray:
    """lambda_j = prod_{m != j} (at - x_m) / (x_j - x_m) mod p, as int64 (one per x)."""
    x = _check_xs(xs)
    at = int(at) % PRIME
    hit = np.flatnonzero(x == at)
    if hit.size:  # interpolating at a known point just returns that point
        out = np.zeros(x.size, dtype=np.int64)
        out[hit[0]] = 1
        return out
    row: np.ndarray = _lagrange_rows(x[None, :], at)[0]
    return row


# -- split ------------------------------------------------------------------------------------


def split_many(
    secrets: Sequence[bytes],
    *,
    threshold: int,
    xs: Sequence[int],
    randbytes: Randbytes = os.urandom,
) -> list[list[bytes]]:
    """Share every secret t-of-n: result[i][j] is the share of secrets[i] for xs[j]."""
    x = _check_xs(xs)
    t = _check_threshold(threshold, x.size)
    m = len(secrets)
    if m == 0:
        return []
    limbs = _secrets_to_limbs(secrets)  # (m, L)
    coeffs = _random_field_elements((t - 1, m, LIMBS), randbytes)
    # Horner over all secrets, xs and limbs at once: values < 2^31, so acc * x < 2^62.
    acc = np.broadcast_to(limbs[:, None, :], (m, x.size, LIMBS)).copy()
    if t > 1:
        acc[...] = coeffs[t - 2][:, None, :]
        xcol = x[None, :, None]
        for k in range(t - 3, -2, -1):
            term = limbs if k < 0 else coeffs[k]
            acc *= xcol
            acc += term[:, None, :]
            acc %= PRIME
    raw = acc.astype("<u4").tobytes()
    return [
        [
            raw[(i * x.size + j) * SHARE_BYTES : (i * x.size + j + 1) * SHARE_BYTES]
            for j in range(x.size)
        ]
        for i in range(m)
    ]


def split(
    secret: bytes, *, threshold: int, xs: Sequence[int], randbytes: Randbytes = os.urandom
) -> list[bytes]:
    """Shares of one 32-byte secret, one per x in `xs` (same order)."""
    return split_many([secret], threshold=threshold, xs=xs, randbytes=randbytes)[0]


# -- combine ----------------------------------------------------------------------------------


def _parse_share(share: bytes, where: str) -> bytes:
    return require_bytes(share, SHARE_BYTES, where)


def _sorted_share_xs(mapping: Mapping[int, bytes]) -> list[int]:
    """The x-coordinates of one mapping, sorted and validated (keys of a mapping are distinct)."""
    try:
        keys = sorted(mapping)
    except TypeError:
        keys = []
    if keys and set(map(type, keys)) == {int} and keys[0] >= 1 and keys[-1] < PRIME:
        return keys
    return sorted(_check_xs(list(mapping)).tolist())


def combine_many(
    shares: Sequence[Mapping[int, bytes]], *, threshold: int, verify: bool = False
) -> list[bytes]:
    """Reconstruct each secret from its {x: share} mapping (at least `threshold` entries).

    The `threshold` shares with the smallest x are interpolated, all secrets in one set of
    array operations: Lagrange coefficients for every distinct set of x-coordinates (computed
    once per set, vectorised across sets), then one multiply-reduce over
    (secrets x threshold x limbs). With `verify=True`, every share beyond the threshold must
    lie on the interpolated polynomial, or CryptoError is raised.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int | np.integer) or threshold < 1:
        raise CryptoError(f"threshold: {threshold!r} must be an int >= 1")
    t = int(threshold)
    m = len(shares)
    if m == 0:
        return []
    parts: list[bytes] = []
    group_of: dict[tuple[int, ...], int] = {}
    which = np.empty(m, dtype=np.int64)
    for i, mapping in enumerate(shares):
        if len(mapping) < t:
            raise CryptoError(f"shares[{i}]: {len(mapping)} shares, threshold is {t}")
        keys = _sorted_share_xs(mapping)[:t]
        which[i] = group_of.setdefault(tuple(keys), len(group_of))
        values = [mapping[x] for x in keys]
        # Fast check in C: every share is bytes of the right length; else name the culprit.
        if set(map(type, values)) != {bytes} or set(map(len, values)) != {SHARE_BYTES}:
            values = [_parse_share(mapping[x], f"shares[{i}][{x}]") for x in keys]
        parts.append(b"".join(values))
    vals = np.frombuffer(b"".join(parts), dtype="<u4").astype(np.int64).reshape(m, t, LIMBS)
    out_of_field = (vals >= PRIME).any(axis=(1, 2))
    if out_of_field.any():
        bad = int(np.flatnonzero(out_of_field)[0])
        raise CryptoError(f"shares[{bad}]: a share holds a value >= the field prime")
    unique_sets = np.array(list(group_of), dtype=np.int64).reshape(len(group_of), t)
    lam = _lagrange_rows(unique_sets, 0)[which]  # (m, t)
    chosen = unique_sets[which]
    secret_limbs = (vals * lam[:, :, None] % PRIME).sum(axis=1) % PRIME
    if verify:
        _verify_extra(shares, chosen, vals)
    return _limbs_to_secrets(secret_limbs)


def _verify_extra(
    shares: Sequence[Mapping[int, bytes]], chosen: np.ndarray, vals: np.ndarray
) -> None:
    """Check that each share outside the interpolated ones equals the polynomial there."""
    for i, mapping in enumerate(shares):
        row = chosen[i]
        used = set(row.tolist())
        extra = [x for x in mapping if x not in used]
        if not extra:
            continue
        at = np.array(extra, dtype=np.int64)
        # Coefficients evaluating the polynomial through `row` at each extra x: (e, t).
        lam = np.stack([_lagrange_rows(row[None, :], int(x))[0] for x in at])
        expect = (lam[:, :, None] * vals[i][None, :, :] % PRIME).sum(axis=1) % PRIME
        got = np.frombuffer(
            b"".join(_parse_share(mapping[x], f"shares[{i}][{x}]") for x in extra), dtype="<u4"
        ).reshape(len(extra), LIMBS)
        mismatch = (expect != got.astype(np.int64)).any(axis=1)
        if mismatch.any():
            x = extra[int(np.flatnonzero(mismatch)[0])]
            raise CryptoError(f"shares[{i}][{x}]: inconsistent with the other shares")


def combine(shares: Mapping[int, bytes], *, threshold: int, verify: bool = False) -> bytes:
    """The 32-byte secret from at least `threshold` shares {x: share}."""
    return combine_many([shares], threshold=threshold, verify=verify)[0]
