"""The SecAgg server (the director's side of one round), as a sans-IO state machine.

The node layer feeds `receive(sender, body)` and sends what it returns; when a stage deadline
passes it calls `close_stage()`, and whoever has not answered that stage is a dropout from then
on. A stage also closes by itself as soon as everybody expected has answered. Which message
each stage collects and which stage follows is SERVER_TRANSITIONS (protocol.secagg.transitions);
a stage ends with its closer (pruning, threshold checks) and the next one begins with the
message its opener broadcasts. A refused message is recorded (`take_refusals`), never raised.

Sets, as in Bonawitz et al.: U1 advertised keys, U2 shared keys, U3 sent a masked input
(`survivors`), U4 signed the survivor set (malicious mode), U5 answered Unmask. The graph is
seeded with the digest of the roster U1 (the clients' signed advertisements, as the clients
derive it too). Clients whose neighbourhood cannot reach the threshold are pruned from U2
(excluded, not an abort); at U1 such a client excludes itself.
The round aborts cleanly, revealing nothing, when fewer than t clients remain at a stage or a
needed secret cannot gather t shares.

The server keeps only the running sum of masked inputs, never a single client's vector.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import structlog

from crypto import agreement, shamir, signing
from crypto.errors import CryptoError
from crypto.prg import MaskAccumulator
from protocol.base import Message
from protocol.errors import ProtocolError
from protocol.events import BROADCAST, Outgoing, RefusalLog, Refused
from protocol.secagg.common import (
    MASK_INFO,
    TRAIN,
    consistency_signing_payload,
    keys_signing_payload,
    pair_info,
    partners_bitmap,
    roster_digest,
    session_context,
    survivors_digest,
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
from protocol.secagg.transitions import (
    SERVER_TRANSITIONS,
    Aborted,
    Outcome,
    State,
    advance,
)
from protocol.stages import SECAGG_STAGES, Stage
from protocol.tensors import TensorError, to_numpy

log = structlog.get_logger("fedbus.secagg.server")


class SecAggServerError(ProtocolError):
    """Invalid construction arguments (a programming error, not a peer's fault)."""


class SecAggServer(RefusalLog):
    def __init__(
        self,
        round: int,
        params: SecAggParams,
        participants: Sequence[str],
        vector_length: int,
        client_signing_keys: Mapping[str, bytes] | None = None,
        *,
        federation: str = "",
        purpose: str = TRAIN,
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
        super().__init__("fedbus.secagg.server", "secagg_refused")
        self.round = round
        self.params = params
        self.participants = frozenset(participants)
        self.vector_length = vector_length
        self._signing_keys = (
            {p: (client_signing_keys or {})[p] for p in participants} if params.malicious else {}
        )
        self.context = session_context(
            federation=federation,
            purpose=purpose,
            session=round,
            participants=sorted(participants),
            identity_keys=self._signing_keys,
        )
        self._graph: Graph | None = None  # seeded with the roster's digest (U1)
        self._roster_digest = b""
        self.stage: State = Stage.ADVERTISE_KEYS
        self.abort_reason = ""
        self.result: np.ndarray | None = None
        self._keys: dict[str, AdvertisedKeys] = {}  # U1
        self._ciphertexts: dict[str, Mapping[str, bytes]] = {}  # U2: sender -> {recipient: ct}
        self._u2: frozenset[str] = frozenset()
        self._sum: np.ndarray | None = None
        self._u3: set[str] = set()
        self._survivors: frozenset[str] = frozenset()
        self._dropouts: frozenset[str] = frozenset()
        self._signatures: dict[str, bytes] = {}  # U4
        self._bitmaps: dict[str, bytes] = {}  # U4's partner sets
        self._responded: set[str] = set()  # U5
        self._answered: dict[str, Stage] = {}  # the last stage each client answered
        self._b_shares: dict[str, dict[int, bytes]] = {}
        self._s_shares: dict[str, dict[int, bytes]] = {}

    # -- public API --------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return isinstance(self.stage, Outcome)

    @property
    def aborted(self) -> bool:
        return self.stage is Outcome.ABORTED

    @property
    def graph(self) -> Graph:
        """The session's graph, known once AdvertiseKeys closed."""
        if self._graph is None:
            raise SecAggServerError("the graph is known once the key roster is settled")
        return self._graph

    @property
    def survivors(self) -> frozenset[str]:
        """U3: the clients whose inputs are in the sum (empty before MaskedInput closes)."""
        return self._survivors

    @property
    def dropouts(self) -> frozenset[str]:
        """Participants whose input is not in the sum (so far: whoever has not answered)."""
        if self._survivors:
            return self.participants - self._survivors
        if self.stage is Stage.MASKED_INPUT:
            return self.participants - self._u2
        if self.stage is Stage.SHARE_KEYS:
            return self.participants - self._keys.keys()
        return frozenset()

    @property
    def stages(self) -> tuple[Stage, ...]:
        """The stages of this round, in order (consistency only in the malicious mode)."""
        return tuple(
            s for s in SECAGG_STAGES if self.params.malicious or s is not Stage.CONSISTENCY
        )

    @property
    def awaiting(self) -> frozenset[str]:
        """The clients the current stage still waits for (none once the server is done)."""
        if self.stage is Stage.ADVERTISE_KEYS:
            return self.participants - self._keys.keys()
        if self.stage is Stage.SHARE_KEYS:
            return frozenset(self._keys.keys() - self._ciphertexts.keys())
        if self.stage is Stage.MASKED_INPUT:
            return self._u2 - self._u3
        if self.stage is Stage.CONSISTENCY:
            return self._survivors - self._signatures.keys()
        if self.stage is Stage.UNMASK:
            return self._unmask_responders() - self._responded
        return frozenset()

    def short_of_threshold(self) -> bool:
        """Whether closing the current stage now would end the session for lack of answers
        (fewer than t; in unmask, a secret with fewer than t shares): then a participant that
        is only silent, not gone, is worth waiting for until the deadline."""
        t = self.params.t
        if self.stage is Stage.ADVERTISE_KEYS:
            return len(self._keys) < t
        if self.stage is Stage.SHARE_KEYS:
            return len(self._ciphertexts) < t
        if self.stage is Stage.MASKED_INPUT:
            return len(self._u3) < t
        if self.stage is Stage.CONSISTENCY:
            return len(self._signatures) < t
        if self.stage is Stage.UNMASK:
            return not self._have_all_shares()
        return False

    def stopped_at(self, client: str) -> Stage | None:
        """The first stage `client` has not answered (None: it answered every stage)."""
        last = self._answered.get(client)
        stages = self.stages
        following = stages[stages.index(last) + 1 :] if last is not None else stages
        return following[0] if following else None

    def receive(self, sender: str, body: Message) -> list[Outgoing]:
        """Collect one client message; when the stage has all it expects, it closes."""
        if self.done:
            return self.refuse(sender, body, f"server is {self.stage}", round=self.round)
        if sender not in self.participants:
            return self.refuse(sender, body, "sender is not a participant", round=self.round)
        if getattr(body, "round", None) != self.round:
            reason = f"round {getattr(body, 'round', None)} != {self.round}"
            return self.refuse(sender, body, reason, round=self.round)
        kind = type(body)
        handler = _HANDLERS.get(kind)
        if handler is None:
            return self.refuse(sender, body, "not a message for the server", round=self.round)
        stage = self.stage
        if not isinstance(stage, Stage) or (stage, kind) not in SERVER_TRANSITIONS:
            return self.refuse(sender, body, f"server is at stage {stage}", round=self.round)
        try:
            complete = handler(self, sender, body)
        except Refused as refusal:
            return self.refuse(sender, body, refusal.reason, round=self.round)
        self._answered[sender] = stage
        return self.close_stage() if complete else []

    def close_stage(self) -> list[Outgoing]:
        """The stage deadline passed: whoever has not answered is a dropout; move on."""
        if self.done:
            return []
        assert isinstance(self.stage, Stage)
        try:
            _CLOSERS[self.stage](self)
            self.stage = advance(
                SERVER_TRANSITIONS,
                self.stage,
                _COLLECTS[self.stage],
                malicious=self.params.malicious,
            )
            return _OPENERS[self.stage](self)
        except Aborted as abort:
            return self._abort(abort.reason)

    # -- AdvertiseKeys -----------------------------------------------------------------------

    def _on_keys(self, sender: str, body: SecAggAdvertiseKeys) -> bool:
        if sender in self._keys:
            raise Refused("duplicate")
        keys = body.keys
        if self.params.malicious:
            try:
                signing.verify(
                    self._signing_keys[sender],
                    keys_signing_payload(self.context, sender, keys.c_public, keys.s_public),
                    keys.signature,
                )
            except CryptoError:
                raise Refused("invalid signature on the keys") from None
        self._keys[sender] = keys
        return len(self._keys) == len(self.participants)

    def _close_keys(self) -> None:
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
        if len(admitted) < self.params.t:
            raise Aborted(f"{len(admitted)} clients advertised keys, threshold {self.params.t}")
        self._keys = {u: self._keys[u] for u in admitted}
        # The graph follows from the admitted advertisements, exactly as each client
        # derives it from the roster; a client whose neighbourhood in the roster is too thin
        # excludes itself and is pruned at ShareKeys.
        self._roster_digest = roster_digest(
            self.context,
            ((u, k.c_public, k.s_public, k.signature) for u, k in self._keys.items()),
        )
        self._graph = build_graph(
            sorted(self.participants),
            kind=self.params.graph,
            k=self.params.k,
            round=self.round,
            graph_seed=self._roster_digest,
        )

    def _open_share_keys(self) -> list[Outgoing]:
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

    def _on_share_keys(self, sender: str, body: SecAggShareKeys) -> bool:
        if sender not in self._keys:
            raise Refused("not admitted at AdvertiseKeys")
        if sender in self._ciphertexts:
            raise Refused("duplicate")
        expected = self.graph.neighbours(sender) & self._keys.keys()
        if body.ciphertexts.keys() != expected:
            raise Refused("ciphertexts are not addressed to its neighbours")
        self._ciphertexts[sender] = body.ciphertexts
        return len(self._ciphertexts) == len(self._keys)

    def _close_share_keys(self) -> None:
        u2 = self._prune(set(self._ciphertexts), set(self._ciphertexts))
        if len(u2) < self.params.t:
            raise Aborted(f"{len(u2)} clients shared keys, threshold {self.params.t}")
        self._u2 = frozenset(u2)

    def _open_masked_input(self) -> list[Outgoing]:
        out = []
        for v in sorted(self._u2):
            incoming = {
                u: self._ciphertexts[u][v] for u in sorted(self.graph.neighbours(v) & self._u2)
            }
            out.append(Outgoing(v, SecAggForwardedShares(round=self.round, ciphertexts=incoming)))
        self._ciphertexts.clear()
        return out

    # -- MaskedInput -------------------------------------------------------------------------

    def _on_masked(self, sender: str, body: SecAggMaskedInput) -> bool:
        if sender not in self._u2:
            raise Refused("did not share keys")
        if sender in self._u3:
            raise Refused("duplicate")
        try:
            vector = to_numpy(body.masked)
        except TensorError as exc:
            raise Refused(f"masked input: {exc}") from None
        if vector.dtype != np.uint32 or vector.shape != (self.vector_length,):
            raise Refused(
                f"masked input is {vector.dtype} {vector.shape}, "
                f"need uint32 ({self.vector_length},)"
            )
        if self._sum is None:
            self._sum = vector.copy()
        else:
            self._sum += vector  # uint32: wraps, i.e. addition mod 2^32
        self._u3.add(sender)
        return len(self._u3) == len(self._u2)

    def _close_masked(self) -> None:
        u3 = frozenset(self._u3)
        if len(u3) < self.params.t:
            raise Aborted(f"{len(u3)} masked inputs, threshold {self.params.t}")
        self._survivors = u3
        self._dropouts = self._u2 - u3
        problem = self._reconstructable(u3)
        if problem:
            raise Aborted(problem)

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

    def _open_consistency(self) -> list[Outgoing]:
        request = SecAggConsistencyRequest(round=self.round, survivors=sorted(self._survivors))
        return [Outgoing(BROADCAST, request)]

    def _on_signature(self, sender: str, body: SecAggConsistencySignature) -> bool:
        if sender not in self._survivors:
            raise Refused("not a survivor")
        if sender in self._signatures:
            raise Refused("duplicate")
        # The partners it masked with are its neighbours that shared keys: a client claiming
        # otherwise is refused (its signature could not count towards any honest quorum).
        neighbours = self.graph.neighbours(sender)
        if body.partners != partners_bitmap(neighbours, neighbours & self._u2):
            raise Refused("partner set differs from the shares forwarded to it")
        payload = consistency_signing_payload(
            self.context,
            survivors_digest(self._survivors),
            self._roster_digest,
            body.partners,
        )
        try:
            signing.verify(self._signing_keys[sender], payload, body.signature)
        except CryptoError:
            raise Refused("invalid signature on the survivor set") from None
        self._signatures[sender] = body.signature
        self._bitmaps[sender] = body.partners
        return len(self._signatures) == len(self._survivors)

    def _close_consistency(self) -> None:
        u4 = frozenset(self._signatures)
        if len(u4) < self.params.t:
            raise Aborted(f"{len(u4)} consistency signatures, threshold {self.params.t}")
        # Clients demand t signatures within the closed neighbourhood of every peer whose share
        # they reveal; if that cannot hold the round cannot finish, so stop now.
        problem = self._reconstructable(u4)
        if problem:
            raise Aborted(problem)
        t = self.params.t
        for u in sorted(self._survivors | self._dropouts):
            if len(self.graph.closed(u) & u4) < t:
                raise Aborted(f"fewer than {t} signatures around {u}")

    # -- Unmask ------------------------------------------------------------------------------

    def _open_unmask(self) -> list[Outgoing]:
        request = SecAggUnmaskRequest(
            round=self.round,
            survivors=sorted(self._survivors),
            dropouts=sorted(self._dropouts),
            signatures=dict(sorted(self._signatures.items())),
            partners=dict(sorted(self._bitmaps.items())),
        )
        return [Outgoing(BROADCAST, request)]

    def _unmask_responders(self) -> frozenset[str]:
        return frozenset(self._signatures) if self.params.malicious else self._survivors

    def _on_unmask(self, sender: str, body: SecAggUnmaskResponse) -> bool:
        if sender not in self._unmask_responders():
            raise Refused("not asked to unmask")
        if sender in self._responded:
            raise Refused("duplicate")
        holders_of = self.graph.closed(sender)  # sender holds shares of exactly these peers
        b_ids = set(body.self_mask_shares)
        s_ids = set(body.key_shares)
        if b_ids & s_ids:
            raise Refused("both shares of one peer")
        if not b_ids <= (self._survivors & holders_of & self._u2):
            raise Refused("self-mask shares of non-survivors")
        if not s_ids <= (self._dropouts & holders_of) or sender in s_ids:
            raise Refused("key shares of non-dropouts")
        x = self.graph.x(sender)
        for u, share in body.self_mask_shares.items():
            self._b_shares.setdefault(u, {})[x] = share
        for v, share in body.key_shares.items():
            self._s_shares.setdefault(v, {})[x] = share
        self._responded.add(sender)
        # Done as soon as every secret has t shares; the late responses are then refused.
        return self._have_all_shares() or self._responded >= self._unmask_responders()

    def _have_all_shares(self) -> bool:
        t = self.params.t
        return all(len(self._b_shares.get(u, ())) >= t for u in self._survivors) and all(
            len(self._s_shares.get(v, ())) >= t for v in self._dropouts
        )

    def _close_unmask(self) -> None:
        if not self._have_all_shares():
            raise Aborted("too few unmask responses to remove the masks")

    def _finish(self) -> list[Outgoing]:
        """Reconstruct the secrets and remove every mask from the sum: the round's result."""
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
            raise Aborted(f"share reconstruction failed: {exc}") from None
        assert self._sum is not None
        acc = MaskAccumulator(self.vector_length, initial=self._sum)
        minus: list[bytes] = list(b_seeds)
        plus: list[bytes] = []
        try:
            for v, s_private in zip(dropouts, s_keys, strict=True):
                # A wrong reconstruction (a client sent a bad share) shows here, not as a
                # silently wrong sum.
                if agreement.agreement_public_key(s_private) != self._keys[v].s_public:
                    raise Aborted(f"reconstructed mask key of {v} does not match its key")
                partners = sorted(self.graph.neighbours(v) & self._survivors)
                seeds = [
                    agreement.agree(
                        s_private,
                        self._keys[u].s_public,
                        info=pair_info(MASK_INFO, self.context, u, v),
                    )
                    for u in partners
                ]
                for u, seed in zip(partners, seeds, strict=True):
                    # u added sign(u, v) * PRG(seed): take it out again.
                    (minus if self.graph.sign(u, v) > 0 else plus).append(seed)
        except CryptoError as exc:
            raise Aborted(f"mask reconstruction failed: {exc}") from None
        acc.apply(add=plus, subtract=minus)
        self.result = acc.value
        self._sum = None
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

    def _abort(self, reason: str) -> list[Outgoing]:
        self.stage = Outcome.ABORTED
        self.abort_reason = reason
        self.result = None
        self._sum = None
        self._b_shares.clear()
        self._s_shares.clear()
        log.warning("secagg_server_abort", round=self.round, reason=reason)
        return [Outgoing(BROADCAST, SecAggAbort(round=self.round, reason=reason[:512]))]


# What checks each client message's meaning; whether it may come now is SERVER_TRANSITIONS'.
_HANDLERS: dict[type[Message], Callable[[SecAggServer, str, Any], bool]] = {
    SecAggAdvertiseKeys: SecAggServer._on_keys,
    SecAggShareKeys: SecAggServer._on_share_keys,
    SecAggMaskedInput: SecAggServer._on_masked,
    SecAggConsistencySignature: SecAggServer._on_signature,
    SecAggUnmaskResponse: SecAggServer._on_unmask,
}
# The message type each stage collects (one per stage, from the table).
_COLLECTS: dict[State, type[Message]] = {stage: kind for stage, kind in SERVER_TRANSITIONS}
# What ends a stage (pruning, threshold checks), and the message that opens the next one.
_CLOSERS: dict[Stage, Callable[[SecAggServer], None]] = {
    Stage.ADVERTISE_KEYS: SecAggServer._close_keys,
    Stage.SHARE_KEYS: SecAggServer._close_share_keys,
    Stage.MASKED_INPUT: SecAggServer._close_masked,
    Stage.CONSISTENCY: SecAggServer._close_consistency,
    Stage.UNMASK: SecAggServer._close_unmask,
}
_OPENERS: dict[State, Callable[[SecAggServer], list[Outgoing]]] = {
    Stage.SHARE_KEYS: SecAggServer._open_share_keys,
    Stage.MASKED_INPUT: SecAggServer._open_masked_input,
    Stage.CONSISTENCY: SecAggServer._open_consistency,
    Stage.UNMASK: SecAggServer._open_unmask,
    Outcome.DONE: SecAggServer._finish,
}
