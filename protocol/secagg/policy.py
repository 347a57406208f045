"""The client's own security policy: which SecAgg parameters it accepts from the server.

The server (the director) announces the graph, k and t of a session; a client that took them
on trust would let a malicious server pick t = 2, or switch the malicious-director checks off,
and read single inputs. So the client recomputes what it needs for the announced number of
participants n from its *own* assumptions (at most a fraction `corrupt_fraction` of the
participants colludes with the server, at most `dropout_fraction` drop out) and refuses
anything weaker, before it generates or sends anything:

* the malicious-director variant (signed keys, consistency check) is required
  (`insecure_semi_honest` lifts that, for protocol benchmarks only);
* with C = ceil(corrupt_fraction * n) and k the announced degree (n - 1 for the complete
  graph), 2t * n > (k + 1)(n + C). For the complete graph that is 2t > n + C: the server
  plus C clients cannot collect t shares of both secrets of an honest client by telling
  different honest clients different stories. It is also what makes two survivor sets of one
  training round impossible to get past honest clients (each signs one set per round): every
  unmask needs t signers in each closed neighbourhood, so two disjoint honest signer sets
  need 2(t (n) - C (k + 1)) <= (n - C)(k + 1) clients on average over the neighbourhoods;
* for a SecAgg+ graph (k < n - 1), the failure probability of protocol.secagg.params.analyse
  (corrupt neighbours reaching 2t - k - 1, or the honest survivors splitting into components
  after D = ceil(dropout_fraction * n) dropouts and C corruptions) is at most 2^-40;
* the client masks with at least ceil((1 - dropout_fraction) k) distinct partners (and at
  least t - 1): a server that cuts edges to isolate a group of clients is refused
  (`min_partners`);
* it signs (and unmasks) a survivor set only if it holds at least max(t, n - D, n // 2 + 1)
  of the n participants (`min_survivors`). Honest clients sign one set per session, so two
  survivor sets that share a member would need 2t <= k + 1 + C signers around it, and two
  disjoint ones cannot both be majorities: at most one sum per session, over most clients.

`insecure_any_threshold` skips the (k, t) checks (tests of the threshold mechanics and
benchmarks of deliberately weak parameters; the partner and survivor minimums stay, set by
`dropout_fraction`); nothing in a node sets it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from protocol.errors import ProtocolError
from protocol.secagg.messages import SecAggParams
from protocol.secagg.params import SECURITY_BITS, analyse

__all__ = [
    "DEFAULT_CORRUPT_FRACTION",
    "DEFAULT_DROPOUT_FRACTION",
    "ClientPolicy",
    "PolicyViolation",
    "Verdict",
]

# A tenth of the participants may collude with the director: with no corruption assumed
# (0.0), the parameter finder gives 2t - (k + 1) = 1 and the director plus ONE envoy next to
# a victim recover its input. 0.1 is the fraction Bell et al. (2020) evaluate.
DEFAULT_CORRUPT_FRACTION = 0.1
# As the director's default: a third of a round's participants may drop out.
DEFAULT_DROPOUT_FRACTION = 0.34


class PolicyViolation(ProtocolError):
    """Parameters announced by the server that this client's policy refuses."""


@dataclass(frozen=True)
class Verdict:
    """What the client accepted, for its log: n, k, t and the bounds it checked them against."""

    n: int
    k: int
    t: int
    corrupt: int
    dropouts: int
    min_threshold: int
    min_partners: int
    min_survivors: int
    p_security: float


@dataclass(frozen=True)
class ClientPolicy:
    corrupt_fraction: float = DEFAULT_CORRUPT_FRACTION
    dropout_fraction: float = DEFAULT_DROPOUT_FRACTION
    insecure_semi_honest: bool = False
    insecure_any_threshold: bool = False

    def __post_init__(self) -> None:
        for name in ("corrupt_fraction", "dropout_fraction"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0.0 <= value < 1.0):
                raise ValueError(f"{name}: {value!r} outside [0, 1)")

    def corrupt(self, n: int) -> int:
        return math.ceil(self.corrupt_fraction * n - 1e-12)

    def dropouts(self, n: int) -> int:
        return math.ceil(self.dropout_fraction * n - 1e-12)

    def min_threshold(self, n: int, k: int, *, malicious: bool = True) -> int:
        """The smallest t this policy accepts with degree k among n participants (k + 2 if
        none: the degree itself is too small)."""
        k = _degree(n, k)
        for t in range(1, k + 2):
            if self._secure(n, k, t, malicious):
                return t
        return k + 2

    def min_survivors(self, params: SecAggParams, n: int) -> int:
        """The smallest survivor set this client signs or unmasks (module docstring)."""
        return max(params.t, n - self.dropouts(n), n // 2 + 1)

    def min_partners(self, params: SecAggParams, n: int) -> int:
        """The fewest distinct neighbours this client masks with (see the module docstring)."""
        k = _degree(n, params.k if params.graph == "harary" else n - 1)
        return max(params.t - 1, math.ceil((1.0 - self.dropout_fraction) * k - 1e-9))

    def check(self, params: SecAggParams, n: int) -> Verdict:
        """The verdict on `params` for n participants; PolicyViolation if they are weaker
        than this policy allows."""
        if n < 2:
            raise PolicyViolation(f"{n} participants: secure aggregation needs at least 2")
        if not params.malicious and not self.insecure_semi_honest:
            raise PolicyViolation(
                "the server switched the malicious-director checks off (malicious = false)"
            )
        k = _degree(n, params.k if params.graph == "harary" else n - 1)
        t = params.t
        if t > k + 1:
            raise PolicyViolation(f"threshold {t} exceeds the {k + 1} holders of each secret")
        corrupt, dropouts = self.corrupt(n), self.dropouts(n)
        min_t = self.min_threshold(n, k, malicious=params.malicious)
        result = analyse(n, k, t, dropouts=dropouts, corrupt=corrupt, malicious=params.malicious)
        verdict = Verdict(
            n=n,
            k=k,
            t=t,
            corrupt=corrupt,
            dropouts=dropouts,
            min_threshold=min_t,
            min_partners=self.min_partners(params, n),
            min_survivors=self.min_survivors(params, n),
            p_security=result.p_security,
        )
        if self.insecure_any_threshold:
            return verdict
        if params.malicious and 2 * t * n <= (k + 1) * (n + corrupt):
            raise PolicyViolation(
                f"threshold {t} with k = {k} among n = {n}: 2t <= (k + 1)(1 + C/n) with "
                f"C = {corrupt} colluding clients; this policy needs t >= {min_t}"
            )
        if not self._secure(n, k, t, params.malicious):
            raise PolicyViolation(
                f"(k = {k}, t = {t}) among n = {n} fails 2^-{SECURITY_BITS} security against "
                f"C = {corrupt} colluding and D = {dropouts} dropped clients "
                f"(p = {result.p_security:.3g}); this policy needs t >= {min_t}"
            )
        return verdict

    def _secure(self, n: int, k: int, t: int, malicious: bool) -> bool:
        corrupt, dropouts = self.corrupt(n), self.dropouts(n)
        if malicious and 2 * t * n <= (k + 1) * (n + corrupt):
            return False
        result = analyse(n, k, t, dropouts=dropouts, corrupt=corrupt, malicious=malicious)
        return result.p_security <= 2.0**-SECURITY_BITS


def _degree(n: int, k: int) -> int:
    """The effective degree: a graph of degree >= n - 1 is the complete graph."""
    return min(max(k, 1), n - 1)
