"""Fixed-point quantisation of float updates into Z_2^32 for secure aggregation.

Encoding
--------
With clip c, bits b and at most N summands, let M = floor((2^b - 1) / N) (the largest
integer one summand may contribute) and scale s = M / (2c). A value x is clipped to [-c, c]
and mapped to the integer q = R(s (x + c)) in 0..M, where R rounds stochastically: down
with probability 1 - frac, up with probability frac, so E[q] = s (x + c) (unbiased).
The offset c makes every encoding non-negative (the role two's complement plays for signed
integers), and since each q <= M, a sum of up to N encodings is <= N M <= 2^b - 1 < 2^32:
the sum never wraps, so the exact integer sum survives the mod 2^32 of the masking.
`dequantize_sum` maps a sum S of k encodings back to S / s - k c.

Error bound
-----------
For x in [-c, c] the rounding error is |q - s(x + c)| < 1, i.e. less than 1/s in float units.
`max_error_per_summand` = 1/s, so a dequantised sum of k values is within k/s of the sum of
the clipped inputs (plus float64 rounding, ~1e-16 relative). Values beyond the clip range
additionally lose |x| - c each; choosing c is the caller's trade-off (clip small for
precision, large to keep updates intact).

Weighted FedAvg
---------------
`encode_weighted_update` masks the sample count together with the update: it quantises
delta * w with w = n_samples / sample_cap in [0, 1], and appends w * c as one extra element
(scaled by c so it is representable for any clip). The server's unmasked sum then holds
sum_i w_i delta_i and sum_i w_i, and `decode_weighted_sum` returns their ratio, the
sample-weighted mean update, without the server ever seeing any single client's count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "QuantizationRange",
    "decode_weighted_sum",
    "dequantize_sum",
    "encode_weighted_update",
    "quantize",
]


@dataclass(frozen=True, slots=True)
class QuantizationRange:
    """Clip range [-clip, clip] and the number of summands whose sum must not wrap."""

    clip: float
    max_summands: int
    bits: int = 32
    max_level: int = field(init=False)
    scale: float = field(init=False)

    def __post_init__(self) -> None:
        clip = self.clip
        if isinstance(clip, bool) or not isinstance(clip, int | float | np.floating | np.integer):
            raise ValueError(f"clip: expected a number, got {type(clip).__name__}")
        if not (np.isfinite(clip) and clip > 0):
            raise ValueError(f"clip: {clip} must be finite and > 0")
        n = self.max_summands
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise ValueError(f"max_summands: {n!r} must be an int >= 1")
        b = self.bits
        if isinstance(b, bool) or not isinstance(b, int | np.integer) or not 2 <= b <= 32:
            raise ValueError(f"bits: {b!r} must be an int in 2..32 (sums live in uint32)")
        max_level = (2**b - 1) // int(n)
        if max_level < 1:
            raise ValueError(f"max_summands: {n} too large for {b} bits (no level left)")
        object.__setattr__(self, "clip", float(clip))
        object.__setattr__(self, "max_summands", int(n))
        object.__setattr__(self, "bits", int(b))
        object.__setattr__(self, "max_level", max_level)
        object.__setattr__(self, "scale", max_level / (2.0 * float(clip)))

    @property
    def max_error_per_summand(self) -> float:
        """|dequantised - clipped input| < this, per summand (stochastic rounding < 1 level)."""
        return 1.0 / self.scale


def quantize(x: np.ndarray, qrange: QuantizationRange, *, rng: np.random.Generator) -> np.ndarray:
    """Clip to [-clip, clip], scale, round stochastically (unbiased) -> uint32 in 0..max_level.

    `rng` only drives rounding, which needs no secrecy; masks never come from numpy.
    """
    arr = np.asarray(x, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError("x: contains NaN or infinity")
    c = qrange.clip
    v = (np.clip(arr, -c, c) + c) * qrange.scale
    # v <= max_level up to one float rounding; clamp so the no-wrap bound is exact.
    np.clip(v, 0.0, float(qrange.max_level), out=v)
    low = np.floor(v)
    frac = v - low  # exact in float64
    q = low + (rng.random(v.shape) < frac)
    return q.astype(np.uint32)


def dequantize_sum(total: np.ndarray, qrange: QuantizationRange, summands: int) -> np.ndarray:
    """The float64 sum of `summands` quantised vectors from their (unwrapped) integer sum."""
    if isinstance(summands, bool) or not isinstance(summands, int | np.integer):
        raise ValueError(f"summands: expected int, got {type(summands).__name__}")
    if not 1 <= summands <= qrange.max_summands:
        raise ValueError(
            f"summands: {summands} outside 1..max_summands ({qrange.max_summands}); "
            "a larger sum may have wrapped mod 2^32"
        )
    arr = np.asarray(total)
    if arr.dtype != np.uint32:
        raise ValueError(f"total: expected uint32, got {arr.dtype}")
    if (arr > summands * qrange.max_level).any():
        raise ValueError(
            f"total: an element exceeds summands * max_level = {summands * qrange.max_level}; "
            "not a sum of that many quantised values (wrong summand count or corrupt unmask)"
        )
    return arr.astype(np.float64) / qrange.scale - summands * qrange.clip


def _check_samples(num_samples: int, sample_cap: int) -> float:
    for name, value in (("num_samples", num_samples), ("sample_cap", sample_cap)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"{name}: expected int, got {type(value).__name__}")
    if sample_cap < 1:
        raise ValueError(f"sample_cap: {sample_cap} must be >= 1")
    if not 0 <= num_samples <= sample_cap:
        raise ValueError(
            f"num_samples: {num_samples} outside 0..sample_cap ({sample_cap}); raise the "
            "federation's sample_cap or subsample: a larger weight would overflow the range"
        )
    return int(num_samples) / int(sample_cap)


def encode_weighted_update(
    delta: np.ndarray,
    num_samples: int,
    *,
    sample_cap: int,
    qrange: QuantizationRange,
    rng: np.random.Generator,
) -> np.ndarray:
    """uint32 vector of len(delta) + 1: quantise(delta * w) followed by quantise(w * clip).

    w = num_samples / sample_cap. Each element of delta * w is clipped to the range like any
    value; the weight element is exact up to one rounding level.
    """
    w = _check_samples(num_samples, sample_cap)
    flat = np.asarray(delta, dtype=np.float64).reshape(-1)
    if not np.isfinite(flat).all():
        raise ValueError("delta: contains NaN or infinity")
    payload = np.empty(flat.size + 1, dtype=np.float64)
    np.multiply(flat, w, out=payload[:-1])
    payload[-1] = w * qrange.clip
    return quantize(payload, qrange, rng=rng)


def decode_weighted_sum(
    total: np.ndarray,
    *,
    sample_cap: int,
    qrange: QuantizationRange,
    summands: int,
) -> tuple[np.ndarray, float]:
    """(sample-weighted mean delta, total sample count) from the unmasked sum.

    Error: each mean element is within summands * max_error_per_summand / W of the exact
    weighted mean of the clipped weighted deltas, W = sum of weights (total_samples / cap);
    total_samples is within summands * max_error_per_summand * sample_cap / clip.
    """
    if sample_cap < 1:
        raise ValueError(f"sample_cap: {sample_cap} must be >= 1")
    arr = np.asarray(total)
    if arr.ndim != 1 or arr.size < 2:
        raise ValueError("total: expected a 1-D vector of the update plus the weight element")
    sums = dequantize_sum(arr, qrange, summands)
    weight = sums[-1] / qrange.clip
    # Below half a sample the weight is indistinguishable from rounding noise.
    if weight * sample_cap < 0.5:
        raise ValueError(f"total: summed sample weight {weight * sample_cap:.3g} ~ 0, no samples")
    return sums[:-1] / weight, float(weight * sample_cap)
