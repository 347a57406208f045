"""SecAgg stage messages (Bonawitz et al. 2017, with the SecAgg+ graph of Bell et al. 2020).

Every body carries the round it belongs to, so a state machine can refuse a replay from an
earlier round without trusting the envelope. Field types are bounded: a frame that decodes is
already the right shape, and the state machines only check meaning (who may send what).

Flow (S = server/director, C = client/envoy; "*" = every participant):

    C -> S  SecAggAdvertiseKeys     two X25519 public keys (+ Ed25519 signature if malicious)
    S -> *  SecAggKeyRoster         the keys of every admitted client
    C -> S  SecAggShareKeys         one AES-GCM ciphertext of (s-key share, b share) per neighbour
    S -> C  SecAggForwardedShares   the ciphertexts addressed to this client
    C -> S  SecAggMaskedInput       y = x + PRG(b) + sum +/-PRG(s_uv)   (mod 2^32)
    S -> *  SecAggConsistencyRequest    the survivor set            (malicious mode only)
    C -> S  SecAggConsistencySignature  Ed25519 over the survivor set, the roster digest and
                                        the client's partner set (malicious mode only)
    S -> *  SecAggUnmaskRequest     survivors, dropouts (+ the signatures and partner sets)
    C -> S  SecAggUnmaskResponse    b shares of survivors, s-key shares of dropouts
    S -> *  SecAggAbort             the round ends without a result
"""

from __future__ import annotations

from typing import Annotated, get_args

import msgspec

from protocol.base import Message
from protocol.tensors import Tensor
from protocol.types import NodeId, Round, ShortText

# Bounds: a federation is at most this many participants per round (the graph, the parameter
# finder and every list below are sized by it).
MAX_PARTICIPANTS = 100_000

PublicKey = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
# A client's partner set: one bit per graph neighbour (protocol.secagg.common.partners_bitmap).
PartnerBitmap = Annotated[bytes, msgspec.Meta(max_length=(MAX_PARTICIPANTS + 7) // 8)]
# Empty in semi-honest mode, an Ed25519 signature (64 bytes) in malicious mode.
OptionalSignature = Annotated[bytes, msgspec.Meta(max_length=64)]
Signature = Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]
# nonce (12) + AES-GCM(msgpack of two shares) + tag (16); generous but bounded.
Ciphertext = Annotated[bytes, msgspec.Meta(min_length=28, max_length=1024)]
Share = Annotated[bytes, msgspec.Meta(min_length=1, max_length=256)]
NodeList = Annotated[list[NodeId], msgspec.Meta(max_length=MAX_PARTICIPANTS)]


class SecAggParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What every party must agree on before a round (sent in RoundStart).

    graph: "complete" (every pair masks; k is then n - 1 whatever is written here) or
        "harary" (SecAgg+: a random k-regular Harary graph over the participants, the
        permutation derived from the digest of the clients' signed key advertisements, so
        the server cannot pick it; see protocol.secagg.common.roster_digest).
    k: the number of neighbours of each client (its shares go to k neighbours + itself).
    t: the Shamir threshold: a secret needs t of the k + 1 shares; also the smallest number
        of inputs the server may ever learn a sum of.
    clip: the quantisation range [-clip, clip] the envoys use for their updates.
    malicious: the malicious-director variant (signed keys, consistency check).

    A client checks these against its own policy (protocol.secagg.policy) before it takes part.
    """

    graph: Annotated[str, msgspec.Meta(pattern="^(complete|harary)$")]
    k: Annotated[int, msgspec.Meta(ge=1, le=MAX_PARTICIPANTS)]
    t: Annotated[int, msgspec.Meta(ge=1, le=MAX_PARTICIPANTS)]
    clip: Annotated[float, msgspec.Meta(gt=0)]
    malicious: bool = True


class AdvertisedKeys(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    c_public: PublicKey  # encryption key (shares travel under agree(c_u, c_v))
    s_public: PublicKey  # mask key (pairwise masks are PRG(agree(s_u, s_v)))
    signature: OptionalSignature = b""


class SecAggAdvertiseKeys(Message, frozen=True):
    round: Round
    keys: AdvertisedKeys


class SecAggKeyRoster(Message, frozen=True):
    round: Round
    keys: Annotated[dict[NodeId, AdvertisedKeys], msgspec.Meta(max_length=MAX_PARTICIPANTS)]


class SecAggShareKeys(Message, frozen=True):
    """recipient -> ciphertext of its shares of the sender's s-key and self-mask seed."""

    round: Round
    ciphertexts: Annotated[dict[NodeId, Ciphertext], msgspec.Meta(max_length=MAX_PARTICIPANTS)]


class SecAggForwardedShares(Message, frozen=True):
    """sender -> ciphertext addressed to the recipient of this message."""

    round: Round
    ciphertexts: Annotated[dict[NodeId, Ciphertext], msgspec.Meta(max_length=MAX_PARTICIPANTS)]


class SecAggMaskedInput(Message, frozen=True):
    round: Round
    masked: Tensor  # uint32, shape (vector_length,)


class SecAggConsistencyRequest(Message, frozen=True):
    round: Round
    survivors: NodeList


class SecAggConsistencySignature(Message, frozen=True):
    round: Round
    signature: Signature
    partners: PartnerBitmap = b""


class SecAggUnmaskRequest(Message, frozen=True):
    round: Round
    survivors: NodeList
    dropouts: NodeList
    signatures: Annotated[dict[NodeId, Signature], msgspec.Meta(max_length=MAX_PARTICIPANTS)] = (
        msgspec.field(default_factory=dict)
    )
    # The signers' partner bitmaps, each covered by that signer's signature.
    partners: Annotated[dict[NodeId, PartnerBitmap], msgspec.Meta(max_length=MAX_PARTICIPANTS)] = (
        msgspec.field(default_factory=dict)
    )


class SecAggUnmaskResponse(Message, frozen=True):
    round: Round
    self_mask_shares: Annotated[dict[NodeId, Share], msgspec.Meta(max_length=MAX_PARTICIPANTS)]
    key_shares: Annotated[dict[NodeId, Share], msgspec.Meta(max_length=MAX_PARTICIPANTS)]


class SecAggAbort(Message, frozen=True):
    round: Round
    reason: ShortText = ""


class SharePlaintext(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    """What a ShareKeys ciphertext seals (never on the wire in the clear)."""

    s_share: Share
    b_share: Share


SecAggMessage = (
    SecAggAdvertiseKeys
    | SecAggKeyRoster
    | SecAggShareKeys
    | SecAggForwardedShares
    | SecAggMaskedInput
    | SecAggConsistencyRequest
    | SecAggConsistencySignature
    | SecAggUnmaskRequest
    | SecAggUnmaskResponse
    | SecAggAbort
)
SECAGG_MESSAGES: tuple[type[Message], ...] = get_args(SecAggMessage)

__all__ = [
    "MAX_PARTICIPANTS",
    "SECAGG_MESSAGES",
    "AdvertisedKeys",
    "SecAggAbort",
    "SecAggAdvertiseKeys",
    "SecAggConsistencyRequest",
    "SecAggConsistencySignature",
    "SecAggForwardedShares",
    "SecAggKeyRoster",
    "SecAggMaskedInput",
    "SecAggMessage",
    "SecAggParams",
    "SecAggShareKeys",
    "SecAggUnmaskRequest",
    "SecAggUnmaskResponse",
    "SharePlaintext",
]
