"""The byte strings both state machines derive: what gets signed, and the HKDF info and AEAD
purpose strings (one definition, so client and server can never disagree)."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable

from protocol.stages import Stage

DEFAULT_SERVER_ID = "director"

_DOMAIN = b"fedbus/secagg/v1"

# HKDF info purposes of the two pairwise keys (see pair_info): the c-key encrypts the shares
# a client sends its neighbour, the s-key seeds the pairwise mask.
ENC_INFO = "secagg/c"
MASK_INFO = "secagg/s"
# AEAD associated-data purpose of a ShareKeys ciphertext.
SHARE_PURPOSE = "secagg/share_keys"


def _pack(*parts: bytes | str | int) -> bytes:
    out = [struct.pack(">I", len(_DOMAIN)), _DOMAIN]
    for part in parts:
        if isinstance(part, int):
            out.append(struct.pack(">Q", part))
            continue
        raw = part.encode("utf-8") if isinstance(part, str) else part
        out.append(struct.pack(">I", len(raw)))
        out.append(raw)
    return b"".join(out)


def keys_signing_payload(round: int, node: str, c_public: bytes, s_public: bytes) -> bytes:
    """What a client signs in AdvertiseKeys: its two keys, bound to its id and the round."""
    return _pack(Stage.ADVERTISE_KEYS, round, node, c_public, s_public)


def survivors_signing_payload(round: int, survivors: Iterable[str]) -> bytes:
    """What a client signs in ConsistencyCheck: the round and a digest of the sorted
    survivor set (length-prefixed names), so the signed message stays small for any n."""
    h = hashlib.sha256()
    for name in sorted(survivors):
        raw = name.encode("utf-8")
        h.update(b"%d:%b" % (len(raw), raw))
    return _pack(Stage.CONSISTENCY, round, h.digest())


def pair_info(purpose: str, round: int, u: str, v: str) -> bytes:
    """HKDF info for the key shared by u and v: symmetric in (u, v), bound to round and use.

    Length-prefixed fields (unambiguous for any strings); built with one format because a
    round computes it for every edge of the graph.
    """
    a, b = (u, v) if u <= v else (v, u)
    ab, bb, pb = a.encode(), b.encode(), purpose.encode()
    return b"%b|%d:%b|%d|%d:%b|%d:%b" % (_DOMAIN, len(pb), pb, round, len(ab), ab, len(bb), bb)
