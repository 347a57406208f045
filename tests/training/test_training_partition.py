"""Partitioners: disjoint, covering, deterministic; Dirichlet skew behaves like one."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.training.partition import (
    partition_by_folder,
    partition_dirichlet,
    partition_iid,
    select_partition,
)


def _assert_disjoint_cover(parts: list[np.ndarray], size: int) -> None:
    joined = np.concatenate(parts)
    assert joined.size == size, "partitions overlap or miss samples"
    assert np.array_equal(np.sort(joined), np.arange(size))
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "indices must be sorted and unique"


labels_strategy = st.lists(st.integers(0, 1), min_size=1, max_size=600).map(np.array)


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 2000), n=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
def test_iid_is_a_balanced_deterministic_partition(size: int, n: int, seed: int) -> None:
    if n > size:
        with pytest.raises(ValueError, match="non-empty"):
            partition_iid(size, n, seed)
        return
    parts = partition_iid(size, n, seed)
    _assert_disjoint_cover(parts, size)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1
    again = partition_iid(size, n, seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


@settings(max_examples=80, deadline=None)
@given(
    labels=labels_strategy,
    n=st.integers(1, 10),
    alpha=st.floats(0.05, 100.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_is_a_deterministic_partition(
    labels: np.ndarray, n: int, alpha: float, seed: int
) -> None:
    if n > labels.size:
        with pytest.raises(ValueError):
            partition_dirichlet(labels, n, alpha, seed)
        return
    parts = partition_dirichlet(labels, n, alpha, seed)
    assert len(parts) == n
    _assert_disjoint_cover(parts, labels.size)
    assert all(p.size > 0 for p in parts)
    for cls in (0, 1):
        if np.sum(labels == cls) >= 2 * n:  # enough to give everyone two: everyone has some
            assert all(np.any(labels[p] == cls) for p in parts)
    again = partition_dirichlet(labels, n, alpha, seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random(4708) < 0.742).astype(np.int64)  # PneumoniaMNIST's prior

    def spread(alpha: float) -> float:
        # mean over seeds of the std of the envoys' pneumonia fractions
        out = []
        for seed in range(20):
            parts = partition_dirichlet(labels, 5, alpha, seed)
            out.append(np.std([labels[p].mean() for p in parts]))
        return float(np.mean(out))

    assert spread(0.1) > spread(0.5) > spread(100.0)
    assert spread(100.0) < 0.03
    assert spread(0.5) > 0.1


def test_dirichlet_different_seeds_differ() -> None:
    labels = np.arange(500) % 2
    a = partition_dirichlet(labels, 5, 0.5, 1)
    b = partition_dirichlet(labels, 5, 0.5, 2)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_dirichlet_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="alpha"):
        partition_dirichlet(np.zeros(10), 2, 0.0, 1)
    with pytest.raises(ValueError, match=">= 1"):
        partition_dirichlet(np.zeros(10), 0, 0.5, 1)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(["hosp-a", "hosp-b", "hosp-c", "x"]), min_size=1, max_size=200))
def test_by_folder_groups_each_source(sources: list[str]) -> None:
    parts = partition_by_folder(sources)
    assert list(parts) == sorted(set(sources))
    _assert_disjoint_cover(list(parts.values()), len(sources))
    for name, idx in parts.items():
        assert all(sources[i] == name for i in idx)


def test_select_partition_matches_the_full_partition() -> None:
    labels = np.arange(1000) % 3 == 0
    full = partition_dirichlet(labels.astype(int), 5, 0.5, 7)
    for i in range(5):
        got = select_partition(
            labels.astype(int), scheme="dirichlet", num_envoys=5, index=i, seed=7
        )
        assert np.array_equal(got, full[i])
    assert np.array_equal(
        select_partition(labels, scheme="iid", num_envoys=4, index=3, seed=1),
        partition_iid(1000, 4, 1)[3],
    )
    with pytest.raises(ValueError, match="scheme"):
        select_partition(labels, scheme="zipf", num_envoys=2, index=0, seed=1)
    with pytest.raises(ValueError, match="out of range"):
        select_partition(labels, scheme="iid", num_envoys=2, index=2, seed=1)
