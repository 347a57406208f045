"""Who masks with whom: the complete graph or a random Harary k-regular graph (SecAgg+).

Every party derives the same graph from public data only, so a client can check the director
did not pick its neighbours: the participant list (sorted, so order never matters), the
round, k, and `graph_seed`: the digest of the session's key roster, i.e. of the clients'
signed key advertisements (protocol.secagg.common.roster_digest), which the server cannot
choose. (It can still choose whose advertisements to admit; see the README's threat model.)

Harary graph H(k, n) on a ring of n positions: position p is joined to p +/- 1 .. p +/- k//2;
for odd k and even n also to the antipodal p + n/2; for odd k and odd n to p + (n+1)/2 for
p <= (n-1)/2 (the standard construction: one vertex gets degree k + 1). Bell et al. (2020)
place the nodes on the ring by a uniformly random permutation. Here the permutation sorts
the nodes by 32-bit keys from the SecAgg PRG (AES-256-CTR, crypto.prg.expand_mask) seeded
with SHA-256(domain, graph_seed, round, k, participants), ties broken by index (a tie has
probability below n^2 / 2^33 and only makes the order deterministic, never invalid).

Share x-coordinates are a node's index in the sorted participant list plus one, so they are
the same for everybody and never 0 (the secret sits at 0).
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Sequence

import numpy as np

from crypto.prg import expand_mask
from protocol.errors import ProtocolError

GRAPH_DOMAIN = b"fedbus/secagg/graph/v1"


class GraphError(ProtocolError):
    """Participants or graph parameters that do not make a valid graph."""


def graph_digest(participants: Sequence[str], *, round: int, k: int, graph_seed: bytes) -> bytes:
    """The 32-byte seed of the permutation (see the module docstring)."""
    h = hashlib.sha256()
    h.update(struct.pack(">I", len(GRAPH_DOMAIN)) + GRAPH_DOMAIN)
    h.update(struct.pack(">I", len(graph_seed)) + graph_seed)
    h.update(struct.pack(">QQQ", round, k, len(participants)))
    for p in participants:
        raw = p.encode("utf-8")
        h.update(struct.pack(">I", len(raw)) + raw)
    return h.digest()


class Graph:
    """The neighbourhoods of one round's participants.

    `neighbours(u)` excludes u; `closed(u)` includes it (the holders of u's shares).
    Neighbourhoods are computed on demand from the ring positions, so a client pays for its own
    neighbourhood only, not for the whole graph.
    """

    def __init__(
        self, participants: Sequence[str], *, kind: str, k: int, round: int, graph_seed: bytes
    ) -> None:
        nodes = sorted(participants)
        if len(set(nodes)) != len(nodes):
            raise GraphError("participants: duplicate node ids")
        if not nodes:
            raise GraphError("participants: empty")
        if kind not in ("complete", "harary"):
            raise GraphError(f"graph: unknown kind {kind!r} (complete | harary)")
        n = len(nodes)
        if kind == "harary" and k < 2 and n > 2:
            raise GraphError(f"k: a Harary graph needs k >= 2, got {k}")
        self.nodes: tuple[str, ...] = tuple(nodes)
        self.n = n
        self.index: dict[str, int] = {u: i for i, u in enumerate(nodes)}
        self.complete = kind == "complete" or k >= n - 1
        self.k = n - 1 if self.complete else k
        self._cache: dict[str, frozenset[str]] = {}
        if self.complete:
            self._everyone = frozenset(nodes)
            return
        seed = graph_digest(nodes, round=round, k=k, graph_seed=graph_seed)
        keys = expand_mask(seed, n)
        # lexsort: primary key last; ties (negligible) fall back to the index.
        order = np.lexsort((np.arange(n), keys))
        self._ring: list[int] = order.tolist()  # ring position -> node index
        self._position = np.empty(n, dtype=np.int64)
        self._position[order] = np.arange(n)

    @property
    def ring(self) -> tuple[str, ...]:
        """The nodes in ring order (Harary); the sorted participants for the complete graph."""
        if self.complete:
            return self.nodes
        return tuple(self.nodes[i] for i in self._ring)

    def x(self, node: str) -> int:
        """The Shamir x-coordinate of `node` (its sorted index + 1)."""
        return self.index[node] + 1

    def sign(self, u: str, v: str) -> int:
        """+1 if u adds PRG(s_uv) to its input, -1 if it subtracts it (v does the opposite)."""
        return 1 if self.index[u] < self.index[v] else -1

    def _ring_neighbours(self, p: int) -> set[int]:
        n, k = self.n, self.k
        half = k // 2
        out = {(p + d) % n for d in range(1, half + 1)} | {(p - d) % n for d in range(1, half + 1)}
        if k % 2:
            if n % 2 == 0:
                out.add((p + n // 2) % n)
            else:
                step = (n + 1) // 2
                if p <= (n - 1) // 2:
                    out.add((p + step) % n)
                q = (p - step) % n
                if q <= (n - 1) // 2 and (q + step) % n == p:
                    out.add(q)
        out.discard(p)
        return out

    def neighbours(self, node: str) -> frozenset[str]:
        cached = self._cache.get(node)
        if cached is not None:
            return cached
        if node not in self.index:
            raise GraphError(f"node {node!r} is not a participant")
        if self.complete:
            result = self._everyone - {node}
        else:
            p = int(self._position[self.index[node]])
            result = frozenset(self.nodes[self._ring[q]] for q in self._ring_neighbours(p))
        self._cache[node] = result
        return result

    def closed(self, node: str) -> frozenset[str]:
        return self.neighbours(node) | {node}


@functools.lru_cache(maxsize=16)
def _cached_graph(
    participants: tuple[str, ...], kind: str, k: int, round: int, graph_seed: bytes
) -> Graph:
    return Graph(participants, kind=kind, k=k, round=round, graph_seed=graph_seed)


def build_graph(
    participants: Sequence[str], *, kind: str, k: int, round: int, graph_seed: bytes
) -> Graph:
    """The round's graph; identical arguments share one instance (it is immutable in effect).

    Sharing matters in one-process simulations of a thousand clients, each of which would
    otherwise rebuild the same permutation.
    """
    return _cached_graph(tuple(sorted(participants)), kind, k, round, graph_seed)
