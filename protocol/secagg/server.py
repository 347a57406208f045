"""The SecAgg server (the director's side of one round), as a sans-IO state machine.

The node layer feeds `receive(sender, body)` and sends what it returns; when a stage deadline
passes it calls `close_stage()`, and whoever has not answered that stage is a dropout from then
on. A stage also closes by itself as soon as everybody expected has answered.

Sets, as in Bonawitz et al.: U1 advertised keys, U2 shared keys, U3 sent a masked input
(`survivors`), U4 signed the survivor set (malicious mode), U5 answered Unmask. Clients whose
neighbourhood cannot reach the threshold are pruned from U1 and U2 (excluded, not an abort).
The round aborts cleanly, revealing nothing, when fewer than t clients remain at a stage or a
needed secret cannot gather t shares.

The server keeps only the running sum of masked inputs, never a single client's vector.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import structlog

from crypto import agreement, shamir, signing
from crypto.errors import CryptoError
from crypto.prg import MaskAccumulator
from protocol.secagg.common import (
    ABORTED,
    ADVERTISE_KEYS,
    BROADCAST,
    CONSISTENCY,
    DONE,
    MASKED_INPUT,
    SHARE_KEYS,
    UNMASK,
    Outgoing,
    Refusal,
    keys_signing_payload,
    pair_info,
    survivors_signing_payload,
)
from protocol.secagg.graph import Graph, build_graph
from protocol.secagg.messages import (
    AdvertisedKeys,
    SecAggAbort,
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
from protocol.tensors import TensorError, to_numpy

log = structlog.get_logger("fedbus.secagg.server")

_MASK_INFO = "secagg/s"  # must match the client


class SecAggServerError(ValueError):
    """Invalid construction arguments (a programming error, not a peer's fault)."""


class SecAggServer:
    def __init__(
        self,
        round: int,
        params: SecAggParams,
        participants: Sequence[str],
        vector_length: int,
        client_signing_keys: Mapping[str, bytes] | None = None,
    ) -> None:
        if len(set(participants)) != len(participants):
            raise SecAggServerError("participants: duplicate node ids")
        if params.t > len(participants):
            raise SecAggServerError(
                f"params.t: threshold {params.t} exceeds the {len(participants)} participants"
            )
        if vector_length < 1:
            raise SecAggServerError(f"vector_length: must be positive, got {vector_length}")
        if params.malicious:
            missing = [p for p in participants if p not in (client_signing_keys or {})]
            if missing:
                raise SecAggServerError(
                    f"client_signing_keys: missing for {len(missing)} participants, e.g. {missing[0]!r}"
                )
        self.round = round
        self.params = params
        self.participants = frozenset(participants)
        self.vector_length = vector_length
        self.graph: Graph = build_graph(
            participants, kind=params.graph, k=params.k, round=round, graph_seed=params.graph_seed
        )
        self._signing_keys = dict(client_signing_keys or {})
        self.stage = ADVERTISE_KEYS
        self.abort_reason = ""
        self.result: np.ndarray | None = None
        self.refusals: list[Refusal] = []
        self._keys: dict[str, AdvertisedKeys] = {}  # U1
        self._ciphertexts: dict[str, Mapping[str, bytes]] = {}  # U2: sender -> {recipient: ct}
        self._u2: frozenset[str] = frozenset()
        self._sum: np.ndarray | None = None
        self._u3: set[str] = set()
        self._survivors: frozenset[str] = frozenset()
        self._dropouts: frozenset[str] = frozenset()
        self._signatures: dict[str, bytes] = {}  # U4
        self._responded: set[str] = set()  # U5
        self._b_shares: dict[str, dict[int, bytes]] = {}
        self._s_shares: dict[str, dict[int, bytes]] = {}

    # -- public API --------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.stage in (DONE, ABORTED)

    @property
    def aborted(self) -> bool:
        return self.stage == ABORTED

    @property
    def survivors(self) -> frozenset[str]:
        """U3: the clients whose inputs are in the sum (empty before MaskedInput closes)."""
        return self._survivors

    @property
    def dropouts(self) -> frozenset[str]:
        """Participants whose input is not in the sum (so far: whoever has not answered)."""
        if self._survivors:
            return self.participants - self._survivors
        if self.stage == MASKED_INPUT:
            return self.participants - self._u2
        if self.stage == SHARE_KEYS:
            return self.participants - self._keys.keys()
        return frozenset()

    def receive(self, sender: str, body: object) -> list[Outgoing]:
        if self.done:
            return self._refuse(sender, body, f"server is {self.stage}")
        if sender not in self.participants:
            return self._refuse(sender, body, "sender is not a participant")
        if getattr(body, "round", None) != self.round:
            return self._refuse(
                sender, body, f"round {getattr(body, 'round', None)} != {self.round}"
            )
        handler = {
            SecAggAdvertiseKeys: (ADVERTISE_KEYS, self._on_keys),
            SecAggShareKeys: (SHARE_KEYS, self._on_share_keys),
            SecAggMaskedInput: (MASKED_INPUT, self._on_masked),
            SecAggConsistencySignature: (CONSISTENCY, self._on_signature),
            SecAggUnmaskResponse: (UNMASK, self._on_unmask),
        }.get(type(body))
        if handler is None:
            return self._refuse(sender, body, "not a message for the server")
        stage, fn = handler
        if stage != self.stage:
            return self._refuse(sender, body, f"server is at stage {self.stage}")
        return fn(sender, body)

    def close_stage(self) -> list[Outgoing]:
        """The stage deadline passed: whoever has not answered is a dropout; move on."""
        if self.done:
            return []
        closer = {
            ADVERTISE_KEYS: self._close_keys,
            SHARE_KEYS: self._close_share_keys,
            MASKED_INPUT: self._close_masked,
            CONSISTENCY: self._close_consistency,
            UNMASK: self._close_unmask,
        }[self.stage]
        return closer()

    # -- AdvertiseKeys -----------------------------------------------------------------------

    def _on_keys(self, sender: str, body: SecAggAdvertiseKeys) -> list[Outgoing]:
        if sender in self._keys:
            return self._refuse(sender, body, "duplicate")
        keys = body.keys
        if self.params.malicious:
            try:
                signing.verify(
                    self._signing_keys[sender],
                    keys_signing_payload(self.round, sender, keys.c_public, keys.s_public),
                    keys.signature,
                )
            except CryptoError:
                return self._refuse(sender, body, "invalid signature on the keys")
        self._keys[sender] = keys
        if len(self._keys) == len(self.participants):
            return self._close_keys()
        return []

    def _close_keys(self) -> list[Outgoing]:
        # Equal keys across clients would let one client's shares be read by another: drop
        # every client involved in a collision (honest keys collide with probability 2^-250).
        count: dict[bytes, int] = {}
        for keys in self._keys.values():
            for key in {keys.c_public, keys.s_public}:
                count[key] = count.get(key, 0) + 1
        admitted = {
            u
            for u, keys in self._keys.items()
            if keys.c_public != keys.s_public
            and count[keys.c_public] == 1
            and count[keys.s_public] == 1
        }
        admitted = self._prune(admitted, admitted)
        if len(admitted) < self.params.t:
            return self._abort(
                f"{len(admitted)} clients advertised keys, threshold {self.params.t}"
            )
        self._keys = {u: self._keys[u] for u in admitted}
        self.stage = SHARE_KEYS
        roster = SecAggKeyRoster(round=self.round, keys=dict(sorted(self._keys.items())))
        return [Outgoing(BROADCAST, roster)]

    def _prune(self, members: set[str], holders: set[str]) -> set[str]:
        """Drop members whose closed neighbourhood within `holders` is below t, repeatedly."""
        t = self.params.t
        members = set(members)
        holders = set(holders)
        changed = True
        while changed:
            changed = False
            for u in sorted(members):
                if len(self.graph.closed(u) & holders) < t:
                    members.discard(u)
                    holders.discard(u)
                    changed = True
        return members

    # -- ShareKeys ---------------------------------------------------------------------------

    def _on_share_keys(self, sender: str, body: SecAggShareKeys) -> list[Outgoing]:
        if sender not in self._keys:
            return self._refuse(sender, body, "not admitted at AdvertiseKeys")
        if sender in self._ciphertexts:
            return self._refuse(sender, body, "duplicate")
        expected = self.graph.neighbours(sender) & self._keys.keys()
        if body.ciphertexts.keys() != expected:
            return self._refuse(sender, body, "ciphertexts are not addressed to its neighbours")
        self._ciphertexts[sender] = body.ciphertexts
        if len(self._ciphertexts) == len(self._keys):
            return self._close_share_keys()
        return []

    def _close_share_keys(self) -> list[Outgoing]:
        u2 = self._prune(set(self._ciphertexts), set(self._ciphertexts))
        if len(u2) < self.params.t:
            return self._abort(f"{len(u2)} clients shared keys, threshold {self.params.t}")
        self._u2 = frozenset(u2)
        self.stage = MASKED_INPUT
        out = []
        for v in sorted(u2):
            incoming = {
                u: self._ciphertexts[u][v] for u in sorted(self.graph.neighbours(v) & self._u2)
            }
            out.append(Outgoing(v, SecAggForwardedShares(round=self.round, ciphertexts=incoming)))
        self._ciphertexts.clear()
        return out

    # -- MaskedInput -------------------------------------------------------------------------

    def _on_masked(self, sender: str, body: SecAggMaskedInput) -> list[Outgoing]:
        if sender not in self._u2:
            return self._refuse(sender, body, "did not share keys")
        if sender in self._u3:
            return self._refuse(sender, body, "duplicate")
        try:
            vector = to_numpy(body.masked)
        except TensorError as exc:
            return self._refuse(sender, body, f"masked input: {exc}")
        if vector.dtype != np.uint32 or vector.shape != (self.vector_length,):
            return self._refuse(
                sender,
                body,
                f"masked input is {vector.dtype} {vector.shape}, "
                f"need uint32 ({self.vector_length},)",
            )
        if self._sum is None:
            self._sum = vector.copy()
        else:
            self._sum += vector  # uint32: wraps, i.e. addition mod 2^32
        self._u3.add(sender)
        if len(self._u3) == len(self._u2):
            return self._close_masked()
        return []

    def _close_masked(self) -> list[Outgoing]:
        u3 = frozenset(self._u3)
        if len(u3) < self.params.t:
            return self._abort(f"{len(u3)} masked inputs, threshold {self.params.t}")
        self._survivors = u3
        self._dropouts = self._u2 - u3
        problem = self._reconstructable(u3)
        if problem:
            return self._abort(problem)
        if self.params.malicious:
            self.stage = CONSISTENCY
            request = SecAggConsistencyRequest(round=self.round, survivors=sorted(u3))
            return [Outgoing(BROADCAST, request)]
        return self._request_unmask()

    def _reconstructable(self, responders: Iterable[str]) -> str:
        """Why some secret could not gather t shares if only `responders` answer, or ''."""
        responders = frozenset(responders)
        t = self.params.t
        for u in sorted(self._survivors):
            if len(self.graph.closed(u) & self._u2 & responders) < t:
                return f"the self mask of {u} cannot gather {t} shares"
        for v in sorted(self._dropouts):
            if len(self.graph.neighbours(v) & self._u2 & responders) < t:
                return f"the mask key of dropout {v} cannot gather {t} shares"
        return ""

    # -- ConsistencyCheck --------------------------------------------------------------------

    def _on_signature(self, sender: str, body: SecAggConsistencySignature) -> list[Outgoing]:
        if sender not in self._survivors:
            return self._refuse(sender, body, "not a survivor")
        if sender in self._signatures:
            return self._refuse(sender, body, "duplicate")
        try:
            signing.verify(
                self._signing_keys[sender],
                survivors_signing_payload(self.round, self._survivors),
                body.signature,
            )
        except CryptoError:
            return self._refuse(sender, body, "invalid signature on the survivor set")
        self._signatures[sender] = body.signature
        if len(self._signatures) == len(self._survivors):
            return self._close_consistency()
        return []

    def _close_consistency(self) -> list[Outgoing]:
        u4 = frozenset(self._signatures)
        if len(u4) < self.params.t:
            return self._abort(f"{len(u4)} consistency signatures, threshold {self.params.t}")
        # Clients demand t signatures within the closed neighbourhood of every peer whose share
        # they reveal; if that cannot hold the round cannot finish, so stop now.
        problem = self._reconstructable(u4)
        if problem:
            return self._abort(problem)
        t = self.params.t
        for u in sorted(self._survivors | self._dropouts):
            if len(self.graph.closed(u) & u4) < t:
                return self._abort(f"fewer than {t} signatures around {u}")
        return self._request_unmask()

    # -- Unmask ------------------------------------------------------------------------------

    def _request_unmask(self) -> list[Outgoing]:
        self.stage = UNMASK
        request = SecAggUnmaskRequest(
            round=self.round,
            survivors=sorted(self._survivors),
            dropouts=sorted(self._dropouts),
            signatures=dict(sorted(self._signatures.items())),
        )
        return [Outgoing(BROADCAST, request)]

    def _unmask_responders(self) -> frozenset[str]:
        return frozenset(self._signatures) if self.params.malicious else self._survivors

    def _on_unmask(self, sender: str, body: SecAggUnmaskResponse) -> list[Outgoing]:
        if sender not in self._unmask_responders():
            return self._refuse(sender, body, "not asked to unmask")
        if sender in self._responded:
            return self._refuse(sender, body, "duplicate")
        holders_of = self.graph.closed(sender)  # sender holds shares of exactly these peers
        b_ids = set(body.self_mask_shares)
        s_ids = set(body.key_shares)
        if b_ids & s_ids:
            return self._refuse(sender, body, "both shares of one peer")
        if not b_ids <= (self._survivors & holders_of & self._u2):
            return self._refuse(sender, body, "self-mask shares of non-survivors")
        if not s_ids <= (self._dropouts & holders_of) or sender in s_ids:
            return self._refuse(sender, body, "key shares of non-dropouts")
        x = self.graph.x(sender)
        for u, share in body.self_mask_shares.items():
            self._b_shares.setdefault(u, {})[x] = share
        for v, share in body.key_shares.items():
            self._s_shares.setdefault(v, {})[x] = share
        self._responded.add(sender)
        if self._have_all_shares():
            return self._finish()
        if self._responded >= self._unmask_responders():
            return self._close_unmask()
        return []

    def _have_all_shares(self) -> bool:
        t = self.params.t
        return all(len(self._b_shares.get(u, ())) >= t for u in self._survivors) and all(
            len(self._s_shares.get(v, ())) >= t for v in self._dropouts
        )

    def _close_unmask(self) -> list[Outgoing]:
        if not self._have_all_shares():
            return self._abort("too few unmask responses to remove the masks")
        return self._finish()

    def _finish(self) -> list[Outgoing]:
        t = self.params.t
        survivors = sorted(self._survivors)
        dropouts = sorted(self._dropouts)

        def first_t(shares: Mapping[int, bytes]) -> dict[int, bytes]:
            return dict(sorted(shares.items())[:t])

        try:
            b_seeds = shamir.combine_many(
                [first_t(self._b_shares[u]) for u in survivors], threshold=t
            )
            s_keys = shamir.combine_many(
                [first_t(self._s_shares[v]) for v in dropouts], threshold=t
            )
        except CryptoError as exc:
            return self._abort(f"share reconstruction failed: {exc}")
        assert self._sum is not None
        acc = MaskAccumulator(self.vector_length, initial=self._sum)
        minus: list[bytes] = list(b_seeds)
        plus: list[bytes] = []
        try:
            for v, s_private in zip(dropouts, s_keys, strict=True):
                # A wrong reconstruction (a client sent a bad share) shows here, not as a
                # silently wrong sum.
                if agreement.agreement_public_key(s_private) != self._keys[v].s_public:
                    return self._abort(f"reconstructed mask key of {v} does not match its key")
                partners = sorted(self.graph.neighbours(v) & self._survivors)
                seeds = [
                    agreement.agree(
                        s_private,
                        self._keys[u].s_public,
                        info=pair_info(_MASK_INFO, self.round, u, v),
                    )
                    for u in partners
                ]
                for u, seed in zip(partners, seeds, strict=True):
                    # u added sign(u, v) * PRG(seed): take it out again.
                    (minus if self.graph.sign(u, v) > 0 else plus).append(seed)
        except CryptoError as exc:
            return self._abort(f"mask reconstruction failed: {exc}")
        acc.apply(add=plus, subtract=minus)
        self.result = acc.value
        self._sum = None
        self.stage = DONE
        self._b_shares.clear()
        self._s_shares.clear()
        log.info(
            "secagg_done",
            round=self.round,
            survivors=len(self._survivors),
            dropouts=len(self.participants) - len(self._survivors),
        )
        return []

    # -- helpers -----------------------------------------------------------------------------

    def _refuse(self, sender: str, body: object, reason: str) -> list[Outgoing]:
        self.refusals.append(Refusal(sender, type(body).__name__, reason))
        log.debug("secagg_refused", round=self.round, sender=sender, reason=reason)
        return []

    def _abort(self, reason: str) -> list[Outgoing]:
        self.stage = ABORTED
        self.abort_reason = reason
        self.result = None
        self._sum = None
        self._b_shares.clear()
        self._s_shares.clear()
        log.warning("secagg_server_abort", round=self.round, reason=reason)
        return [Outgoing(BROADCAST, SecAggAbort(round=self.round, reason=reason[:512]))]
