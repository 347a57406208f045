"""The (k, t) finder: its probabilities are exact, its choices meet the targets and are minimal."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.secagg.params import (
    ParameterError,
    analyse,
    find_parameters,
    hypergeom_tail,
)


def _exact_tail(population: int, marked: int, draws: int, at_least: int) -> Fraction:
    total = math.comb(population, draws)
    return sum(
        (
            Fraction(math.comb(marked, x) * math.comb(population - marked, draws - x), total)
            for x in range(max(at_least, 0), min(marked, draws) + 1)
        ),
        Fraction(0),
    )


@settings(max_examples=200, deadline=None)
@given(
    population=st.integers(1, 300),
    data=st.data(),
)
def test_hypergeometric_tail_matches_exact_rational(population: int, data: st.DataObject) -> None:
    marked = data.draw(st.integers(0, population))
    draws = data.draw(st.integers(0, population))
    at_least = data.draw(st.integers(-1, draws + 1))
    got = hypergeom_tail(population, marked, draws, at_least)
    want = float(_exact_tail(population, marked, draws, at_least))
    assert got == pytest.approx(want, rel=1e-9, abs=1e-300)


CASES = [
    (n, drop, corrupt, mal)
    for n in (10, 40, 100, 1000)
    for drop, corrupt in ((0.1, 0.0), (0.1, 0.05), (0.2, 0.1), (0.3, 0.1))
    for mal in (False, True)
]


@pytest.mark.parametrize(("n", "drop", "corrupt", "malicious"), CASES)
def test_parameters_meet_targets_and_k_is_minimal(
    n: int, drop: float, corrupt: float, malicious: bool
) -> None:
    try:
        p = find_parameters(n, dropout_fraction=drop, corrupt_fraction=corrupt, malicious=malicious)
    except ParameterError:
        # Only small federations may be infeasible (e.g. malicious with many dropouts).
        assert n <= 10
        return
    dropouts = math.ceil(drop * n - 1e-12)
    corrupt_n = math.ceil(corrupt * n - 1e-12)
    a = analyse(n, p.k, p.t, dropouts=dropouts, corrupt=corrupt_n, malicious=malicious)
    assert a.ok
    assert a.p_correctness <= 2**-20 and a.p_security <= 2**-40
    assert p.malicious == malicious
    if malicious:
        assert 2 * p.t > p.k + 1  # honest majority of every neighbourhood's shares
    if p.graph == "harary" and p.k > 2:
        # The next smaller degree meets both targets with no threshold at all.
        k = p.k - 2
        assert not any(
            analyse(n, k, t, dropouts=dropouts, corrupt=corrupt_n, malicious=malicious).ok
            for t in range(2, k + 1)
        ), (k, p)


def test_malicious_needs_at_least_as_many_neighbours() -> None:
    for n in (100, 1000):
        semi = find_parameters(n, dropout_fraction=0.1, corrupt_fraction=0.05, malicious=False)
        mal = find_parameters(n, dropout_fraction=0.1, corrupt_fraction=0.05, malicious=True)
        assert mal.k >= semi.k


def test_sparse_graph_for_large_n() -> None:
    p = find_parameters(1000, dropout_fraction=0.1, corrupt_fraction=0.05, malicious=False)
    assert p.graph == "harary" and p.k < 100  # logarithmic, not linear, in n


def test_infeasible_raises_with_reason() -> None:
    with pytest.raises(ParameterError, match="malicious"):
        find_parameters(3, dropout_fraction=0.34, corrupt_fraction=0.34, malicious=True)
    with pytest.raises(ParameterError, match="dropout_fraction"):
        find_parameters(10, dropout_fraction=1.0, corrupt_fraction=0.0)
    with pytest.raises(ParameterError, match="n:"):
        find_parameters(1, dropout_fraction=0.1, corrupt_fraction=0.0)


def test_forced_complete_graph_gets_its_own_threshold() -> None:
    p = find_parameters(40, dropout_fraction=0.1, corrupt_fraction=0.05, graph="complete")
    assert p.graph == "complete" and p.k == 39 and p.t == 40 - 4
    a = analyse(40, p.k, p.t, dropouts=4, corrupt=2, malicious=True)
    assert a.ok


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 3000),
    drop=st.floats(0.0, 0.4),
    corrupt=st.floats(0.0, 0.2),
    malicious=st.booleans(),
)
def test_any_answer_of_the_finder_meets_the_targets(
    n: int, drop: float, corrupt: float, malicious: bool
) -> None:
    try:
        p = find_parameters(n, dropout_fraction=drop, corrupt_fraction=corrupt, malicious=malicious)
    except ParameterError:
        return  # refusing is allowed; answering wrongly is not
    a = analyse(
        n,
        p.k,
        p.t,
        dropouts=math.ceil(drop * n - 1e-12),
        corrupt=math.ceil(corrupt * n - 1e-12),
        malicious=malicious,
    )
    assert a.ok, a
    assert 2 <= p.t <= n and (p.graph == "complete") == (p.k == n - 1)
