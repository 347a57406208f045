"""The SecAgg client (an envoy's side of one round), as a sans-IO state machine.

`start()` returns the AdvertiseKeys message; each `receive(sender, body)` returns the messages
to send next. Nothing here reads a socket or a clock: the node layer moves the messages and
decides when a peer is late. Randomness only comes from the injected `randbytes`.

Rules that keep an input secret even from a malicious director:
* the announced parameters must pass the client's own policy (protocol.secagg.policy: the
  threshold recomputed from n and the client's corrupt and dropout fractions, malicious mode
  required); otherwise the constructor raises PolicyViolation, before any key exists;
* the graph is seeded with the digest of the key roster (the clients' signed advertisements),
  not with anything the server picks, and the client masks with at least `min_partners`
  distinct neighbours;
* the client reveals, per peer, either the self-mask share (peer survived) or the mask-key
  share (peer dropped out), never both: an Unmask request whose survivor and dropout lists
  overlap is refused, and so is one whose survivors differ from the set it signed;
* it signs a survivor set only if it is large (`min_survivors`: a majority, and all but the
  dropouts the policy allows) and every surviving neighbour is one of its partners (a server
  that cut edges to learn the sums of cliques is refused); the signature covers the
  survivor set, the roster digest and its partner set;
* in malicious mode a peer's keys are used only under a valid Ed25519 signature, and a share
  of peer u is only revealed when at least t members of u's closed neighbourhood signed the
  very survivor set and roster of the request (honest clients sign one set per session, so
  with 2t > k + 1 + corrupt neighbours two contradicting sets cannot both gather t
  signatures);
* every signature, HKDF info and AEAD associated data binds the session context (federation,
  purpose, session number, participants and their identity keys: protocol.secagg.common);
* pairwise masks come from the PRG seeded with the whole 32-byte agreement output.

Messages for another stage or round (CLIENT_TRANSITIONS in protocol.secagg.transitions), from
anybody but the server, or repeated, are refused without a state change and recorded for the
driver to take (`take_refusals`). An inconsistency that only a cheating server can cause (a
bad signature, a ciphertext that fails authentication, too few peers to reach the threshold)
aborts the client: it then answers nothing more.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec
import numpy as np
import structlog

from crypto import aead, agreement, shamir, signing
from crypto.errors import CryptoError
from crypto.prg import MaskAccumulator
from protocol.base import Message
from protocol.errors import ProtocolError
from protocol.events import Outgoing, RefusalLog, Refused
from protocol.secagg.common import (
    DEFAULT_SERVER_ID,
    ENC_INFO,
    MASK_INFO,
    TRAIN,
    consistency_signing_payload,
    keys_signing_payload,
    pair_info,
    partners_bitmap,
    roster_digest,
    session_context,
    share_purpose,
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
    SharePlaintext,
)
from protocol.secagg.policy import ClientPolicy
from protocol.secagg.transitions import (
    CLIENT_TRANSITIONS,
    Aborted,
    Outcome,
    State,
    advance,
)
from protocol.stages import Stage
from protocol.tensors import from_numpy

log = structlog.get_logger("fedbus.secagg.client")

_plain_encoder = msgspec.msgpack.Encoder()
_plain_decoder = msgspec.msgpack.Decoder(SharePlaintext)


class SecAggClientError(ProtocolError):
    """Invalid construction arguments or input (a programming error, not a peer's fault)."""


class SecAggClient(RefusalLog):
    def __init__(
        self,
        node_id: str,
        round: int,
        params: SecAggParams,
        participants: Sequence[str],
        signing_key: bytes | None = None,
        peer_signing_keys: Mapping[str, bytes] | None = None,
        randbytes: Callable[[int], bytes] = os.urandom,
        *,
        server_id: str = DEFAULT_SERVER_ID,
        federation: str = "",
        purpose: str = TRAIN,
        policy: ClientPolicy | None = None,
    ) -> None:
        if node_id not in participants:
            raise SecAggClientError(f"node_id: {node_id!r} is not among the participants")
        if len(set(participants)) != len(participants):
            raise SecAggClientError("participants: duplicate node ids")
        if params.t > len(participants):
            raise SecAggClientError(
                f"params.t: threshold {params.t} exceeds the {len(participants)} participants"
            )
        self.policy = policy if policy is not None else ClientPolicy()
        # Before anything is generated: parameters weaker than the policy are refused here.
        self.verdict = self.policy.check(params, len(participants))
        identity: dict[str, bytes] = {}
        if params.malicious:
            if signing_key is None:
                raise SecAggClientError("signing_key: required in malicious mode")
            missing = [p for p in participants if p not in (peer_signing_keys or {})]
            if missing:
                raise SecAggClientError(
                    f"peer_signing_keys: missing for {len(missing)} participants, e.g. {missing[0]!r}"
                )
            identity = {p: (peer_signing_keys or {})[p] for p in participants}
            if identity[node_id] != signing.signing_public_key(signing_key):
                raise SecAggClientError("peer_signing_keys: this client's entry is not its key")
        super().__init__("fedbus.secagg.client", "secagg_refused")
        self.node_id = node_id
        self.round = round
        self.params = params
        self.server_id = server_id
        self.participants: tuple[str, ...] = tuple(sorted(participants))
        self.context = session_context(
            federation=federation,
            purpose=purpose,
            session=round,
            participants=self.participants,
            identity_keys=identity,
        )
        self.min_partners = self.verdict.min_partners
        # Seeded with the key roster's digest, so known once the roster arrived.
        self._graph: Graph | None = None
        self._roster_digest = b""
        self._signing_key = signing_key
        self._peer_signing_keys = identity
        self._randbytes = randbytes
        self.stage: State = Stage.ADVERTISE_KEYS
        self.abort_reason = ""
        self._started = False
        self._input: np.ndarray | None = None
        self._c = agreement.generate_agreement_keypair(randbytes)
        self._s = agreement.generate_agreement_keypair(randbytes)
        self._b = randbytes(32)
        self._roster: dict[str, AdvertisedKeys] = {}
        self._enc_keys: dict[str, bytes] = {}
        # peer -> (s_share, b_share) of that peer's secrets held here (self included).
        self._held: dict[str, tuple[bytes, bytes]] = {}
        self._partners: list[str] = []  # neighbours this client masked with
        self._bitmap = b""
        self._signed_survivors: frozenset[str] | None = None
        self._sig_cache: dict[tuple[str, bytes, bytes], bool] = {}

    @property
    def graph(self) -> Graph:
        """The session's graph (GraphError-free once the roster arrived; before, an error)."""
        if self._graph is None:
            raise SecAggClientError("the graph is known once the key roster arrived")
        return self._graph

    @property
    def partners(self) -> tuple[str, ...]:
        """The neighbours this client masked with (empty before ForwardedShares)."""
        return tuple(self._partners)

    # -- public API --------------------------------------------------------------------------

    @property
    def aborted(self) -> bool:
        return self.stage is Outcome.ABORTED

    @property
    def done(self) -> bool:
        return isinstance(self.stage, Outcome)

    def start(self) -> list[Outgoing]:
        """AdvertiseKeys: the two public keys, signed in malicious mode. Idempotent."""
        if self._started or self.stage is not Stage.ADVERTISE_KEYS:
            return []
        self._started = True
        signature = b""
        if self.params.malicious:
            assert self._signing_key is not None
            signature = signing.sign(
                self._signing_key,
                keys_signing_payload(self.context, self.node_id, self._c.public, self._s.public),
            )
        keys = AdvertisedKeys(c_public=self._c.public, s_public=self._s.public, signature=signature)
        return [Outgoing(self.server_id, SecAggAdvertiseKeys(round=self.round, keys=keys))]

    def set_input(self, vector: np.ndarray) -> list[Outgoing]:
        """The quantised update (uint32). Returns MaskedInput if the shares already arrived.

        May be called before start() or at any time before MaskedInput; the node must send
        whatever this returns.
        """
        arr = np.asarray(vector)
        if arr.dtype != np.uint32 or arr.ndim != 1:
            raise SecAggClientError(f"vector: need a 1-D uint32 array, got {arr.dtype} {arr.shape}")
        if self._input is not None:
            raise SecAggClientError("vector: the input of this round is already set")
        self._input = arr
        return self._masked_input_when_ready()

    def receive(self, sender: str, body: Message) -> list[Outgoing]:
        """The answer to one message from the server; a refused message changes nothing."""
        if self.done:
            return self.refuse(sender, body, f"client is {self.stage}", node=self.node_id)
        if sender != self.server_id:
            return self.refuse(
                sender, body, "only the server drives the protocol", node=self.node_id
            )
        if getattr(body, "round", None) != self.round:
            reason = f"round {getattr(body, 'round', None)} != {self.round}"
            return self.refuse(sender, body, reason, node=self.node_id)
        if isinstance(body, SecAggAbort):
            self._abort(f"server aborted: {body.reason}")
            return []
        kind = type(body)
        handler = _HANDLERS.get(kind)
        if handler is None:
            return self.refuse(sender, body, "not a message for a client", node=self.node_id)
        if (self.stage, kind) not in CLIENT_TRANSITIONS:
            return self.refuse(sender, body, f"client is at stage {self.stage}", node=self.node_id)
        try:
            out = handler(self, body)
        except Refused as refusal:
            return self.refuse(sender, body, refusal.reason, node=self.node_id)
        except Aborted as abort:
            self._abort(abort.reason)
            return []
        self.stage = advance(CLIENT_TRANSITIONS, self.stage, kind, malicious=self.params.malicious)
        return out + self._masked_input_when_ready()

    # -- stages ------------------------------------------------------------------------------

    def _on_roster(self, body: SecAggKeyRoster) -> list[Outgoing]:
        if not self._started:
            raise Refused(f"client is at stage {self.stage}")
        mine = body.keys.get(self.node_id)
        if mine is None:
            # The server excluded this client (e.g. its neighbourhood was too thin).
            raise Aborted("not admitted to the round")
        if mine.c_public != self._c.public or mine.s_public != self._s.public:
            raise Aborted("roster carries other keys under this client's id")
        if not body.keys.keys() <= set(self.participants):
            raise Aborted("roster names a non-participant")
        # The graph follows from the signed advertisements, not from a server's choice.
        self._roster_digest = roster_digest(
            self.context,
            ((v, keys.c_public, keys.s_public, keys.signature) for v, keys in body.keys.items()),
        )
        self._graph = build_graph(
            self.participants,
            kind=self.params.graph,
            k=self.params.k,
            round=self.round,
            graph_seed=self._roster_digest,
        )
        peers = sorted(v for v in self.graph.neighbours(self.node_id) if v in body.keys)
        # Every key this client will use must be distinct (Bonawitz et al.): a server that
        # passed our own key off as a neighbour's could otherwise read our shares. Only the
        # keys of our neighbourhood matter, which keeps this O(k), not O(n), per client.
        used = [
            k
            for v in (self.node_id, *peers)
            for k in (body.keys[v].c_public, body.keys[v].s_public)
        ]
        if len(set(used)) != len(used):
            raise Aborted("roster repeats a public key")
        if len(peers) < self.min_partners:
            raise Aborted(
                f"only {len(peers)} of {len(self.graph.neighbours(self.node_id))} neighbours "
                f"in the roster; this client masks with at least {self.min_partners}"
            )
        for v in peers:
            keys = body.keys[v]
            if self.params.malicious:
                try:
                    signing.verify(
                        self._peer_signing_keys[v],
                        keys_signing_payload(self.context, v, keys.c_public, keys.s_public),
                        keys.signature,
                    )
                except CryptoError:
                    raise Aborted(f"keys of {v} carry an invalid signature") from None
            self._roster[v] = keys
        self._roster[self.node_id] = mine
        return [self._share_keys(peers)]

    def _share_keys(self, peers: list[str]) -> Outgoing:
        """ShareKeys: our s-key and self-mask seed, t-of-(k + 1) shared, sealed per neighbour."""
        holders = [self.node_id, *peers]
        xs = [self.graph.x(v) for v in holders]
        s_shares, b_shares = shamir.split_many(
            [self._s.private, self._b], threshold=self.params.t, xs=xs, randbytes=self._randbytes
        )
        ciphertexts: dict[str, bytes] = {}
        try:
            # One c-key per neighbour, kept: it encrypts our shares now and decrypts theirs later.
            self._enc_keys = {
                v: agreement.agree(
                    self._c.private,
                    self._roster[v].c_public,
                    info=pair_info(ENC_INFO, self.context, self.node_id, v),
                )
                for v in peers
            }
            purpose = share_purpose(self.context)
            for v, s_share, b_share in zip(holders, s_shares, b_shares, strict=True):
                if v == self.node_id:
                    self._held[v] = (s_share, b_share)
                    continue
                plaintext = _plain_encoder.encode(SharePlaintext(s_share=s_share, b_share=b_share))
                ad = aead.associated_data(self.round, self.node_id, v, purpose)
                ciphertexts[v] = aead.encrypt(
                    self._enc_keys[v], plaintext, ad, randbytes=self._randbytes
                )
        except CryptoError as exc:
            raise Aborted(f"share encryption failed: {exc}") from None
        return Outgoing(self.server_id, SecAggShareKeys(round=self.round, ciphertexts=ciphertexts))

    def _on_shares(self, body: SecAggForwardedShares) -> list[Outgoing]:
        if any(u not in self._roster or u == self.node_id for u in body.ciphertexts):
            raise Aborted("forwarded shares from a peer outside this client's neighbourhood")
        if len(body.ciphertexts) < self.min_partners:
            raise Aborted(
                f"shares from only {len(body.ciphertexts)} neighbours; this client masks with "
                f"at least {self.min_partners}"
            )
        held: dict[str, tuple[bytes, bytes]] = {}
        purpose = share_purpose(self.context)
        for u, ciphertext in body.ciphertexts.items():
            try:
                ad = aead.associated_data(self.round, u, self.node_id, purpose)
                plain = _plain_decoder.decode(aead.decrypt(self._enc_keys[u], ciphertext, ad))
            except (CryptoError, msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise Aborted(f"shares from {u} do not decrypt: {exc}") from None
            held[u] = (plain.s_share, plain.b_share)
        self._held.update(held)
        self._partners = sorted(body.ciphertexts)
        self._bitmap = partners_bitmap(self.graph.neighbours(self.node_id), self._partners)
        return []  # MaskedInput follows as soon as the input is set

    def _masked_input_when_ready(self) -> list[Outgoing]:
        """MaskedInput, once the client is at that stage and holds its input; else nothing."""
        if self.stage is not Stage.MASKED_INPUT or self._input is None:
            return []
        try:
            out = self._masked_input(self._input)
        except Aborted as abort:
            self._abort(abort.reason)
            return []
        self._input = None  # the plain update is not needed any more
        self.stage = advance(
            CLIENT_TRANSITIONS, self.stage, SecAggMaskedInput, malicious=self.params.malicious
        )
        return [out]

    def _masked_input(self, vector: np.ndarray) -> Outgoing:
        plus: list[bytes] = [self._b]
        minus: list[bytes] = []
        partners = self._partners
        try:
            # The PRG seed is the whole 32-byte agreement output (HKDF of the X25519 secret).
            seeds = [
                agreement.agree(
                    self._s.private,
                    self._roster[v].s_public,
                    info=pair_info(MASK_INFO, self.context, self.node_id, v),
                )
                for v in partners
            ]
        except CryptoError as exc:
            raise Aborted(f"mask key agreement failed: {exc}") from None
        for v, seed in zip(partners, seeds, strict=True):
            (plus if self.graph.sign(self.node_id, v) > 0 else minus).append(seed)
        acc = MaskAccumulator(vector.size, initial=vector)
        acc.apply(add=plus, subtract=minus)
        masked = from_numpy(acc.value)
        return Outgoing(self.server_id, SecAggMaskedInput(round=self.round, masked=masked))

    def _on_consistency(self, body: SecAggConsistencyRequest) -> list[Outgoing]:
        survivors = frozenset(body.survivors)
        self._check_survivors(survivors, len(body.survivors))
        # A survivor sent its masked input, so it shared keys, so it is one of our partners
        # if it is our neighbour: anything else means the server cut edges of the graph.
        cut = (survivors & self.graph.neighbours(self.node_id)) - set(self._partners)
        if cut:
            raise Refused(
                f"{len(cut)} surviving neighbours are not partners of this client, "
                f"e.g. {min(cut)!r}"
            )
        assert self._signing_key is not None
        signature = signing.sign(self._signing_key, self._consistency_payload(survivors))
        self._signed_survivors = survivors
        reply = SecAggConsistencySignature(
            round=self.round, signature=signature, partners=self._bitmap
        )
        return [Outgoing(self.server_id, reply)]

    def _consistency_payload(self, survivors: frozenset[str], bitmap: bytes | None = None) -> bytes:
        return consistency_signing_payload(
            self.context,
            survivors_digest(survivors),
            self._roster_digest,
            self._bitmap if bitmap is None else bitmap,
        )

    def _check_survivors(self, survivors: frozenset[str], listed: int) -> None:
        if len(survivors) != listed:
            raise Refused("survivor list repeats a node")
        if self.node_id not in survivors:
            raise Refused("this client is not among the survivors")
        if len(survivors) < self.params.t:
            raise Refused(f"{len(survivors)} survivors, below the threshold {self.params.t}")
        if len(survivors) < self.verdict.min_survivors:
            # Two disjoint survivor sets could otherwise both be unmasked in one session.
            raise Refused(
                f"{len(survivors)} survivors of {len(self.participants)}; this client signs "
                f"and unmasks only sets of at least {self.verdict.min_survivors}"
            )
        if not survivors <= self.graph.index.keys():
            raise Refused("survivor list names a non-participant")

    def _on_unmask(self, body: SecAggUnmaskRequest) -> list[Outgoing]:
        survivors = frozenset(body.survivors)
        dropouts = frozenset(body.dropouts)
        if survivors & dropouts:
            # The rule the whole construction rests on: never both shares of one peer.
            raise Refused("survivors and dropouts overlap")
        if len(dropouts) != len(body.dropouts):
            raise Refused("dropout list repeats a node")
        self._check_survivors(survivors, len(body.survivors))
        if self.params.malicious and survivors != self._signed_survivors:
            raise Refused("survivors differ from the set signed")
        reveal_b = [u for u in self._held if u in survivors]
        reveal_s = [u for u in self._held if u in dropouts and u != self.node_id]
        if self.params.malicious:
            digest = survivors_digest(survivors)
            # Ourselves first: our own neighbourhood's signatures serve most of the others.
            order = sorted((*reveal_b, *reveal_s), key=lambda u: u != self.node_id)
            for u in order:
                if not self._enough_signatures(u, survivors, body, digest):
                    raise Refused(f"fewer than t valid signatures around {u}")
        response = SecAggUnmaskResponse(
            round=self.round,
            self_mask_shares={u: self._held[u][1] for u in reveal_b},
            key_shares={u: self._held[u][0] for u in reveal_s},
        )
        self._held.clear()
        return [Outgoing(self.server_id, response)]

    def _enough_signatures(
        self, u: str, survivors: frozenset[str], body: SecAggUnmaskRequest, digest: bytes
    ) -> bool:
        """At least t members of N[u], all survivors, signed exactly `survivors`, the roster
        this client was given and their own partner sets.

        Ed25519 verification dominates malicious-mode cost, so each signature is verified at
        most once per client, and signatures already known valid, then those of this
        client's own neighbourhood (shared by most of the u it answers for), are used first.
        """
        t = self.params.t
        signatures, bitmaps = body.signatures, body.partners
        members = [w for w in self.graph.closed(u) if w in survivors and w in signatures]
        if len(members) < t:
            return False
        cache = self._sig_cache

        def key(w: str) -> tuple[str, bytes, bytes]:
            return (w, signatures[w], bitmaps.get(w, b""))

        good = sum(1 for w in members if cache.get(key(w)) is True)
        if good >= t:
            return True
        mine = self.graph.closed(self.node_id)
        todo = sorted(
            (w for w in members if key(w) not in cache),
            key=lambda w: (w not in mine, w),
        )
        for w in todo:
            # Keyed by the signature and the partner set too: a forged one must not poison a
            # later genuine one.
            payload = consistency_signing_payload(
                self.context, digest, self._roster_digest, bitmaps.get(w, b"")
            )
            try:
                signing.verify(self._peer_signing_keys[w], payload, signatures[w])
                cache[key(w)] = True
                good += 1
            except CryptoError:
                cache[key(w)] = False
            if good >= t:
                return True
        return False

    # -- helpers -----------------------------------------------------------------------------

    def _abort(self, reason: str) -> None:
        self.stage = Outcome.ABORTED
        self.abort_reason = reason
        self._held.clear()
        self._input = None
        log.warning("secagg_client_abort", node=self.node_id, round=self.round, reason=reason)


# What checks each server message's meaning; whether it may come now is CLIENT_TRANSITIONS'.
_HANDLERS: dict[type[Message], Callable[[SecAggClient, Any], list[Outgoing]]] = {
    SecAggKeyRoster: SecAggClient._on_roster,
    SecAggForwardedShares: SecAggClient._on_shares,
    SecAggConsistencyRequest: SecAggClient._on_consistency,
    SecAggUnmaskRequest: SecAggClient._on_unmask,
}
