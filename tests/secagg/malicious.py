"""A scripted malicious director against honest SecAgg clients (the state machines only).

`Attack` builds n honest `SecAggClient`s (their own default policy unless told otherwise) and
lets a test play the server message by message: a different roster, different forwarded
shares and different survivor sets for each client, forged unmask requests. Whatever the
clients answer is collected, and `recover_input` / `partial_sum` do what the attacker would
do with it: rebuild secrets from t shares and strip the masks. A test then asserts that
nothing was recovered.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from crypto import agreement, shamir
from crypto.errors import CryptoError
from crypto.prg import MaskAccumulator
from crypto.signing import generate_signing_keypair, sign
from protocol.errors import ProtocolError
from protocol.events import Outgoing
from protocol.secagg.client import SecAggClient
from protocol.secagg.common import (
    MASK_INFO,
    consistency_signing_payload,
    pair_info,
    survivors_digest,
)
from protocol.secagg.messages import (
    AdvertisedKeys,
    SecAggAdvertiseKeys,
    SecAggConsistencyRequest,
    SecAggConsistencySignature,
    SecAggForwardedShares,
    SecAggKeyRoster,
    SecAggMaskedInput,
    SecAggParams,
    SecAggShareKeys,
    SecAggUnmaskRequest,
    SecAggUnmaskResponse,
)
from protocol.secagg.policy import ClientPolicy
from protocol.secagg.simulate import SERVER, node_names, seeded_randbytes
from protocol.tensors import to_numpy


def only(outs: list[Outgoing], kind: type) -> object | None:
    found = [o.body for o in outs if isinstance(o.body, kind)]
    assert len(found) <= 1
    return found[0] if found else None


@dataclass
class Attack:
    n: int
    params: SecAggParams
    policy: ClientPolicy | None = None
    d: int = 12
    round: int = 7
    seed: int = 0
    federation: str = "victims"
    # Clients that collude with the director: it reads the shares they hold and makes them
    # sign whatever it likes (they run the honest code otherwise).
    corrupt: frozenset[str] = frozenset()
    names: list[str] = field(init=False)
    clients: dict[str, SecAggClient] = field(init=False)
    refused: str = field(init=False, default="")
    inputs: dict[str, np.ndarray] = field(init=False)
    adverts: dict[str, AdvertisedKeys] = field(init=False, default_factory=dict)
    ciphertexts: dict[str, Mapping[str, bytes]] = field(init=False, default_factory=dict)
    masked: dict[str, np.ndarray] = field(init=False, default_factory=dict)
    signatures: dict[str, SecAggConsistencySignature] = field(init=False, default_factory=dict)
    # (responder, survivors of the request it answered, its response)
    responses: list[tuple[str, frozenset[str], SecAggUnmaskResponse]] = field(
        init=False, default_factory=list
    )

    def __post_init__(self) -> None:
        rb = seeded_randbytes(self.seed)
        self.names = node_names(self.n)
        keys = {u: generate_signing_keypair(rb) for u in self.names}
        self.private = {u: k.private for u, k in keys.items()}
        public = {u: k.public for u, k in keys.items()}
        gen = np.random.default_rng(self.seed)
        self.inputs = {u: gen.integers(0, 2**32, self.d, dtype=np.uint32) for u in self.names}
        self.clients = {}
        try:
            for u in self.names:
                self.clients[u] = SecAggClient(
                    u,
                    self.round,
                    self.params,
                    self.names,
                    keys[u].private,
                    public,
                    rb,
                    server_id=SERVER,
                    federation=self.federation,
                    policy=self.policy,
                )
        except ProtocolError as exc:
            self.refused = str(exc)  # the client refused before generating anything
            self.clients = {}
            return
        for u, c in self.clients.items():
            c.set_input(self.inputs[u])

    # -- playing the server ----------------------------------------------------------------

    def advertise(self) -> None:
        for u, c in self.clients.items():
            body = only(c.start(), SecAggAdvertiseKeys)
            assert isinstance(body, SecAggAdvertiseKeys)
            self.adverts[u] = body.keys

    def send_roster(self, to: str, members: Iterable[str] | None = None) -> None:
        members = self.names if members is None else sorted(members)
        roster = SecAggKeyRoster(round=self.round, keys={v: self.adverts[v] for v in members})
        body = only(self.clients[to].receive(SERVER, roster), SecAggShareKeys)
        if isinstance(body, SecAggShareKeys):
            self.ciphertexts[to] = body.ciphertexts

    def forward(self, to: str, senders: Iterable[str] | None = None) -> None:
        senders = self.ciphertexts if senders is None else senders
        fwd = {
            u: self.ciphertexts[u][to]
            for u in sorted(senders)
            if u in self.ciphertexts and to in self.ciphertexts[u]
        }
        out = self.clients[to].receive(
            SERVER, SecAggForwardedShares(round=self.round, ciphertexts=fwd)
        )
        body = only(out, SecAggMaskedInput)
        if isinstance(body, SecAggMaskedInput):
            self.masked[to] = to_numpy(body.masked).copy()

    def ask_consistency(self, to: str, survivors: Iterable[str]) -> bool:
        request = SecAggConsistencyRequest(round=self.round, survivors=sorted(survivors))
        body = only(self.clients[to].receive(SERVER, request), SecAggConsistencySignature)
        if isinstance(body, SecAggConsistencySignature):
            self.signatures[to] = body
            return True
        return False

    def sign_as(self, u: str, survivors: Iterable[str]) -> None:
        """A corrupt client's signature on any survivor set (the director holds its key)."""
        assert u in self.corrupt
        c = self.clients[u]
        payload = consistency_signing_payload(
            c.context, survivors_digest(survivors), c._roster_digest, c._bitmap
        )
        self.signatures[u] = SecAggConsistencySignature(
            round=self.round, signature=sign(self.private[u], payload), partners=c._bitmap
        )

    def ask_unmask(
        self, to: str, survivors: Iterable[str], dropouts: Iterable[str] = (), signers=None
    ) -> bool:
        survivors = frozenset(survivors)
        signers = [
            u for u in (self.signatures if signers is None else signers) if u in self.signatures
        ]
        request = SecAggUnmaskRequest(
            round=self.round,
            survivors=sorted(survivors),
            dropouts=sorted(dropouts),
            signatures={u: self.signatures[u].signature for u in sorted(signers)},
            partners={u: self.signatures[u].partners for u in sorted(signers)},
        )
        body = only(self.clients[to].receive(SERVER, request), SecAggUnmaskResponse)
        if isinstance(body, SecAggUnmaskResponse):
            self.responses.append((to, survivors, body))
            return True
        return False

    def honest_round_to_masked_input(self) -> None:
        """Advertise, the full roster and every share to everybody: the honest first half."""
        self.advertise()
        for u in self.names:
            self.send_roster(u)
        for u in self.names:
            self.forward(u)

    # -- what the attacker gets out of it --------------------------------------------------

    def _shares(self, u: str, kind: str, survivors: frozenset[str] | None = None):
        out: dict[int, bytes] = {}
        for c in self.corrupt:  # whatever colluding holders keep is the director's too
            client = self.clients.get(c)
            if client is not None and u in client._held:
                s_share, b_share = client._held[u]
                out[client.graph.x(c)] = b_share if kind == "b" else s_share
        for responder, surv, body in self.responses:
            if survivors is not None and surv != survivors:
                continue
            shares = body.self_mask_shares if kind == "b" else body.key_shares
            if u in shares:
                out[self.clients[responder].graph.x(responder)] = shares[u]
        return out

    def _secret(self, u: str, kind: str, survivors=None) -> bytes | None:
        shares = self._shares(u, kind, survivors)
        if len(shares) < self.params.t:
            return None
        try:
            return shamir.combine(
                dict(sorted(shares.items())[: self.params.t]), threshold=self.params.t
            )
        except CryptoError:
            return None

    def _pairwise(self, u: str, s_private: bytes) -> MaskAccumulator:
        """PRG(b)-free mask of u: sum over its partners of +/- PRG(s_uv)."""
        c = self.clients[u]
        acc = MaskAccumulator(self.d)
        plus, minus = [], []
        for v in c.partners:
            seed = agreement.agree(
                s_private,
                self.adverts[v].s_public,
                info=pair_info(MASK_INFO, c.context, u, v),
            )
            (plus if c.graph.sign(u, v) > 0 else minus).append(seed)
        acc.apply(add=plus, subtract=minus)
        return acc

    def recover_input(self, u: str) -> np.ndarray | None:
        """x_u, if both secrets of u were revealed (from any requests) and its y_u is known."""
        b = self._secret(u, "b")
        s = self._secret(u, "s")
        if b is None or s is None or u not in self.masked:
            return None
        acc = MaskAccumulator(self.d, initial=self.masked[u])
        acc.apply(add=[], subtract=[b])
        pairwise = self._pairwise(u, s).value
        return acc.value - pairwise

    def partial_sum(self, members: Iterable[str], survivors: frozenset[str]) -> np.ndarray | None:
        """sum of y_u - PRG(b_u) over `members`, from the shares answered for `survivors`
        (the sum of their inputs if no pairwise mask links them to anybody else)."""
        total = np.zeros(self.d, dtype=np.uint32)
        seeds = []
        for u in members:
            b = self._secret(u, "b", survivors)
            if b is None or u not in self.masked:
                return None
            total += self.masked[u]
            seeds.append(b)
        acc = MaskAccumulator(self.d, initial=total)
        acc.apply(add=[], subtract=seeds)
        return acc.value

    def true_sum(self, members: Iterable[str]) -> np.ndarray:
        total = np.zeros(self.d, dtype=np.uint32)
        for u in members:
            total += self.inputs[u]
        return total

    def reconstructable(self, kind: str, survivors: frozenset[str] | None = None) -> set[str]:
        """Honest clients whose secret of `kind` ("b" or "s") gathered t shares."""
        return {
            u
            for u in self.clients
            if u not in self.corrupt and len(self._shares(u, kind, survivors)) >= self.params.t
        }

    def recovered(self) -> dict[str, np.ndarray]:
        """Every honest input the attacker rebuilt exactly."""
        out = {}
        for u in sorted(set(self.clients) - self.corrupt):
            x = self.recover_input(u)
            if x is not None and np.array_equal(x, self.inputs[u]):
                out[u] = x
        return out
