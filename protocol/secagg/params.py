"""Choosing the SecAgg+ graph degree k and the Shamir threshold t (after Bell et al. 2020).

Setting. n clients; the round must tolerate up to D = ceil(delta * n) dropouts (at any stage)
and stay private against the server colluding with up to C = ceil(gamma * n) clients. The
graph is a random Harary graph H(k, n) (protocol.secagg.graph): each client u shares its
mask key s_u and its self-mask seed b_u t-out-of-(k + 1) among its closed neighbourhood
N[u] (its k neighbours and itself). As in Bell et al.'s analysis, who drops out and who is
corrupt is independent of the random graph, so for one client the number of dropped (or
corrupt) neighbours is hypergeometric: k draws from the other n - 1 clients, of which D (or
C) are marked. Union bounds over the n clients give the failure probabilities below, each
computed exactly in log space (no normal or Chernoff approximation).

Correctness (fail at most 2^-20). The server needs t shares of b_u for each survivor and t
shares of s_v for each dropout; only surviving neighbours answer, so every client needs at
least t surviving neighbours (its own share is not counted: a dropout cannot answer):

    P_correct = n * P[Hyp(n - 1, D, k) > k - t]                                  (1)

plus the deterministic n - D >= t (the server never learns a sum of fewer than t inputs).

Security (fail at most 2^-40), two events:

(a) Shares. Semi-honest: an honest client's secret leaks if its corrupt neighbours alone
    hold t shares of it (the server gets the other kind legitimately):
        P_shares = n * P[Hyp(n - 1, C, k) >= t].
    Malicious director: it may tell different honest neighbours different stories (u
    survived / u dropped), so it can collect c corrupt shares of both secrets plus a split
    of the k + 1 - c honest ones. Getting t of each needs 2t <= k + 1 + c. The consistency
    check (every honest client signs one survivor set, and reveals shares of u only under t
    signatures from N[u] on the request's set) is what limits the director to this; so
        P_shares = n * P[Hyp(n - 1, C, k) >= 2t - k - 1],   and 2t > k + 1 is required.

(b) Connectivity. Masks between two honest survivors are what hides their inputs; masks
    with corrupt clients are known to the server and masks with dropouts are removed by it.
    If the honest survivors split into components, the server learns each component's sum.
    On the Harary ring (offsets +/-1..+/-k//2) the survivors stay connected unless two
    disjoint runs of k//2 consecutive ring positions are all dropped-or-corrupt (a single
    run leaves a path). With R = min(n, D + C) such positions, a fixed set of m = 2 (k//2)
    positions is all removed with probability prod_{i<m} (R - i) / (n - i); over at most
    n^2 / 2 pairs of runs:
        P_connect = n^2 / 2 * prod_{i<m} (R - i) / (n - i).
    (The antipodal edges of odd k only help; they are ignored.)

    P_security = P_shares + P_connect <= 2^-40.

Search. For k = 2, 4, ... (even: a Harary ring without the antipodal special case), take the
largest t that satisfies (1) (more shares needed means more security margin and costs
nothing measurable), then check security; the first k that passes wins, since the cost of a
round grows linearly in k (k + 1 PRG expansions and key agreements per client). If no
k < n - 1 passes, the complete graph (k = n - 1) is used, where the conditions are
deterministic: n - D >= t, and C < t (semi-honest) or C < 2t - n (malicious), with
t = n - D. Too few clients for the requested fractions raises ParameterError.

The malicious analysis assumes dropouts as in Bell et al. (not chosen by the adversary after
seeing the graph); a director that fakes dropouts is held back by the signature rule above,
not by this probability.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from protocol.errors import ProtocolError
from protocol.secagg.messages import MAX_PARTICIPANTS, SecAggParams

SECURITY_BITS = 40
CORRECTNESS_BITS = 20


class ParameterError(ProtocolError):
    """No (k, t) meets the targets for the given n and fractions."""


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def hypergeom_tail(population: int, marked: int, draws: int, at_least: int) -> float:
    """P[X >= at_least] for X ~ Hypergeometric(population, marked, draws), exact in log space."""
    lo = max(at_least, 0, draws - (population - marked))
    hi = min(marked, draws)
    if at_least <= max(0, draws - (population - marked)):
        return 1.0
    if lo > hi:
        return 0.0
    base = _log_comb(population, draws)
    logs = [
        _log_comb(marked, x) + _log_comb(population - marked, draws - x) - base
        for x in range(lo, hi + 1)
    ]
    top = max(logs)
    return min(1.0, math.exp(top) * math.fsum(math.exp(v - top) for v in logs))


@dataclass(frozen=True)
class Analysis:
    """The failure probabilities of one (n, k, t) choice (see the module docstring)."""

    n: int
    k: int
    t: int
    dropouts: int
    corrupt: int
    malicious: bool
    p_correctness: float
    p_shares: float
    p_connectivity: float

    @property
    def p_security(self) -> float:
        return self.p_shares + self.p_connectivity

    @property
    def ok(self) -> bool:
        return (
            self.p_correctness <= 2.0**-CORRECTNESS_BITS
            and self.p_security <= 2.0**-SECURITY_BITS
            and self.n - self.dropouts >= self.t
        )


def analyse(n: int, k: int, t: int, *, dropouts: int, corrupt: int, malicious: bool) -> Analysis:
    """Failure probabilities of a Harary graph H(k, n) with threshold t (k = n - 1: complete)."""
    if k >= n - 1:
        k = n - 1
        p_corr = 0.0 if n - dropouts >= t else 1.0
        bound = 2 * t - n if malicious else t
        p_shares = 0.0 if corrupt < bound else 1.0
        return Analysis(n, k, t, dropouts, corrupt, malicious, p_corr, p_shares, 0.0)
    p_corr = min(1.0, n * hypergeom_tail(n - 1, dropouts, k, k - t + 1))
    bound = 2 * t - k - 1 if malicious else t
    p_shares = 1.0 if bound <= 0 else min(1.0, n * hypergeom_tail(n - 1, corrupt, k, bound))
    removed = min(n, dropouts + corrupt)
    m = 2 * (k // 2)
    if removed < m:
        p_conn = 0.0
    else:
        log_p = sum(math.log((removed - i) / (n - i)) for i in range(m))
        p_conn = min(1.0, n * n / 2 * math.exp(log_p))
    return Analysis(n, k, t, dropouts, corrupt, malicious, p_corr, p_shares, p_conn)


def _largest_correct_t(n: int, k: int, dropouts: int) -> int:
    """The largest t with n * P[more than k - t neighbours dropped] <= 2^-20 (0 if none)."""
    target = 2.0**-CORRECTNESS_BITS / n
    population, marked = n - 1, dropouts
    lo = max(0, k - (population - marked))
    hi = min(marked, k)
    # Walk the upper tail P[X >= j + 1] from the top down until it exceeds the target:
    # j = the number of dropped neighbours that must be tolerated, t = k - j.
    base = _log_comb(population, k)
    tail = 0.0
    j = k
    for x in range(k, lo - 1, -1):
        if x <= hi:
            tail += math.exp(_log_comb(marked, x) + _log_comb(population - marked, k - x) - base)
        if tail > target:
            break
        j = x - 1  # P[X >= x] <= target: tolerating x - 1 dropped neighbours suffices
    # The loop always breaks (P[X >= lo] = 1 > target), leaving j = the last x whose tail
    # P[X >= x + 1] met the target.
    return max(0, min(k - j, n - dropouts))


def _feasible(n: int, k: int, dropouts: int, corrupt: int, malicious: bool) -> int:
    """The threshold to use with degree k, or 0 if k does not meet the targets."""
    t = _largest_correct_t(n, k, dropouts)
    if t < 2:
        return 0
    ok = analyse(n, k, t, dropouts=dropouts, corrupt=corrupt, malicious=malicious).ok
    return t if ok else 0


def _search_degree(n: int, dropouts: int, corrupt: int, malicious: bool) -> tuple[int, int] | None:
    """The smallest even k < n - 1 that meets the targets, and its t; None if none does.

    Exhaustive for small n; for large n a galloping search finds a feasible k, bisection
    narrows it (feasibility is monotone in k up to the rounding of t), and a final downward
    scan over the last few even degrees makes sure no smaller one was skipped.
    """
    evens = list(range(2, n - 1, 2))
    if not evens:
        return None
    if len(evens) <= 64:
        for k in evens:
            t = _feasible(n, k, dropouts, corrupt, malicious)
            if t:
                return k, t
        return None
    i = 1
    while i < len(evens) and not _feasible(n, evens[i - 1], dropouts, corrupt, malicious):
        i *= 2
    hi = min(i, len(evens)) - 1
    if not _feasible(n, evens[hi], dropouts, corrupt, malicious):
        hi = len(evens) - 1
        if not _feasible(n, evens[hi], dropouts, corrupt, malicious):
            return None
    lo = max(0, i // 2 - 1)
    while lo < hi:
        mid = (lo + hi) // 2
        if _feasible(n, evens[mid], dropouts, corrupt, malicious):
            hi = mid
        else:
            lo = mid + 1
    for j in range(max(0, hi - 8), hi + 1):
        t = _feasible(n, evens[j], dropouts, corrupt, malicious)
        if t:
            return evens[j], t
    return None  # pragma: no cover  (hi itself is feasible)


def find_parameters(
    n: int,
    *,
    dropout_fraction: float,
    corrupt_fraction: float,
    malicious: bool = True,
    clip: float = 1.0,
    graph: str = "auto",
) -> SecAggParams:
    """The cheapest (k, t) for 2^-40 security and 2^-20 correctness (module docstring).

    graph: "auto" (a Harary graph when one is cheaper), or "complete" to force the complete
    graph, whose threshold is then chosen for it (not taken over from a Harary choice).
    """
    if graph not in ("auto", "complete"):
        raise ParameterError(f"graph: {graph!r} is not 'auto' or 'complete'")
    if not 2 <= n <= MAX_PARTICIPANTS:
        raise ParameterError(f"n: {n} outside 2..{MAX_PARTICIPANTS}")
    if not 0.0 <= dropout_fraction < 1.0:
        raise ParameterError(f"dropout_fraction: {dropout_fraction} outside [0, 1)")
    if not 0.0 <= corrupt_fraction < 1.0:
        raise ParameterError(f"corrupt_fraction: {corrupt_fraction} outside [0, 1)")
    dropouts = math.ceil(dropout_fraction * n - 1e-12)
    corrupt = math.ceil(corrupt_fraction * n - 1e-12)
    best = _search_degree(n, dropouts, corrupt, malicious) if graph == "auto" else None
    if best is not None:
        k, t = best
        return SecAggParams(graph="harary", k=k, t=t, clip=clip, malicious=malicious)
    t = n - dropouts
    result = analyse(n, n - 1, t, dropouts=dropouts, corrupt=corrupt, malicious=malicious)
    if t < 2 or not result.ok:
        raise ParameterError(
            f"n={n}: no threshold tolerates {dropouts} dropouts and {corrupt} corrupt clients "
            f"({'malicious' if malicious else 'semi-honest'}); need n - dropouts > "
            f"{'(n + corrupt) / 2' if malicious else 'corrupt'}"
        )
    return SecAggParams(graph="complete", k=n - 1, t=t, clip=clip, malicious=malicious)


__all__ = [
    "CORRECTNESS_BITS",
    "SECURITY_BITS",
    "Analysis",
    "ParameterError",
    "analyse",
    "find_parameters",
    "hypergeom_tail",
]
