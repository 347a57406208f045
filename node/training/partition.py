"""Partitioners: which samples each envoy (hospital) holds in a simulated federation.

Every partitioner returns a list of sorted int64 index arrays, one per envoy, that are
pairwise disjoint and together cover every sample, and each is a pure function of its
arguments (the seed included), so every envoy process computes the same partition on its
own and takes its share by index: no coordination, no shipping of index lists.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SCHEMES = ("iid", "dirichlet")


def _check_n(n: int, size: int) -> None:
    if n < 1:
        raise ValueError(f"number of partitions must be >= 1, got {n}")
    if n > size:
        raise ValueError(f"cannot split {size} samples into {n} non-empty partitions")


def partition_iid(num_samples: int, n: int, seed: int) -> list[np.ndarray]:
    """Shuffle and deal into `n` parts whose sizes differ by at most one."""
    _check_n(n, num_samples)
    perm = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(part).astype(np.int64) for part in np.array_split(perm, n)]


def partition_dirichlet(
    labels: np.ndarray, n: int, alpha: float, seed: int, *, min_per_class: int = 2
) -> list[np.ndarray]:
    """Label skew: each class is spread over the envoys by proportions drawn from Dir(alpha).

    Smaller alpha means more skew (alpha -> inf tends to IID). Before the Dirichlet draw
    every envoy is dealt `min_per_class` samples of every class that has enough of them
    (n * min_per_class), so no envoy ends up empty or single-class, which would make its
    local loss degenerate and its validation AUC undefined. The rest of each class is cut
    by the drawn proportions, so the skew is still that of Dir(alpha) on the bulk.
    """
    labels = np.asarray(labels).reshape(-1)
    _check_n(n, labels.size)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_per_class < 0:
        raise ValueError(f"min_per_class must be >= 0, got {min_per_class}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        reserve = min_per_class if idx.size >= n * min_per_class else 0
        for i in range(n):
            parts[i].append(idx[i * reserve : (i + 1) * reserve])
        rest = idx[n * reserve :]
        proportions = rng.dirichlet(np.full(n, alpha))
        cuts = (np.cumsum(proportions)[:-1] * rest.size).astype(np.int64)
        for i, chunk in enumerate(np.split(rest, cuts)):
            parts[i].append(chunk)
    out = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
    # Tiny data with no room to reserve can still leave someone empty: take one sample from
    # the largest part, deterministically, so the non-empty guarantee always holds.
    for i, part in enumerate(out):
        if part.size == 0:
            donor = int(np.argmax([p.size for p in out]))
            out[i], out[donor] = out[donor][-1:], out[donor][:-1]
    return out


def partition_by_folder(sources: Sequence[str]) -> dict[str, np.ndarray]:
    """Natural partition: each sample's source (hospital, folder) is its own partition.

    Returns {source: sorted indices}, in sorted source order.
    """
    names = np.asarray([str(s) for s in sources])
    if names.size == 0:
        raise ValueError("no samples to partition")
    return {str(name): np.flatnonzero(names == name).astype(np.int64) for name in np.unique(names)}


def select_partition(
    labels: np.ndarray,
    *,
    scheme: str,
    num_envoys: int,
    index: int,
    seed: int,
    alpha: float = 0.5,
) -> np.ndarray:
    """The indices envoy number `index` (0-based) holds under a scheme; what an envoy calls."""
    if not 0 <= index < num_envoys:
        raise ValueError(f"envoy index {index} out of range for {num_envoys} envoys")
    labels = np.asarray(labels).reshape(-1)
    if scheme == "iid":
        return partition_iid(labels.size, num_envoys, seed)[index]
    if scheme == "dirichlet":
        return partition_dirichlet(labels, num_envoys, alpha, seed)[index]
    raise ValueError(f"partition scheme must be one of {SCHEMES}, got {scheme!r}")
