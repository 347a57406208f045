"""The byte strings both state machines derive: the session context, what gets signed, the
digest of the key roster (the graph seed), and the HKDF info and AEAD purpose strings (one
definition, so client and server can never disagree).

Every signed payload, every HKDF info and every AEAD associated data of a SecAgg session
carries the session's *context*: a digest of the federation id, what the session aggregates
(`PURPOSES`), the session number and the roster of participants with their identity
(Ed25519) keys. A signature or ciphertext of one federation, purpose, session or membership
is therefore worthless in any other, even between nodes that reuse their keys.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping, Sequence

from protocol.stages import Stage

DEFAULT_SERVER_ID = "director"

_DOMAIN = b"fedbus/secagg/v2"

# What a session aggregates: the envoys' model updates, or their validation histograms.
TRAIN = "train"
EVALUATE = "evaluate"
PURPOSES = (TRAIN, EVALUATE)

# HKDF info purposes of the two pairwise keys (see pair_info): the c-key encrypts the shares
# a client sends its neighbour, the s-key seeds the pairwise mask.
ENC_INFO = "secagg/c"
MASK_INFO = "secagg/s"
# AEAD associated-data purpose of a ShareKeys ciphertext (the context is appended, see
# share_purpose).
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


def roster_hash(participants: Sequence[str], identity_keys: Mapping[str, bytes]) -> bytes:
    """SHA-256 over the sorted participants and their Ed25519 public keys (b"" if unknown)."""
    h = hashlib.sha256(b"fedbus/roster/v1")
    for name in sorted(participants):
        raw = name.encode("utf-8")
        key = identity_keys.get(name, b"")
        h.update(struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(key)) + key)
    return h.digest()


def session_context(
    *,
    federation: str,
    purpose: str,
    session: int,
    participants: Sequence[str],
    identity_keys: Mapping[str, bytes],
) -> bytes:
    """The 32-byte context every signature, HKDF info and AEAD associated data binds."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose: {purpose!r} is not one of {PURPOSES}")
    digest = roster_hash(participants, identity_keys)
    return hashlib.sha256(_pack("context", federation, purpose, session, digest)).digest()


def keys_signing_payload(context: bytes, node: str, c_public: bytes, s_public: bytes) -> bytes:
    """What a client signs in AdvertiseKeys: its two keys, bound to its id and the session."""
    return _pack(context, Stage.ADVERTISE_KEYS, node, c_public, s_public)


def survivors_digest(survivors: Iterable[str]) -> bytes:
    """SHA-256 of the sorted survivor set (length-prefixed names): small for any n."""
    h = hashlib.sha256()
    for name in sorted(survivors):
        raw = name.encode("utf-8")
        h.update(b"%d:%b" % (len(raw), raw))
    return h.digest()


def consistency_signing_payload(
    context: bytes, survivors: bytes, roster: bytes, partners: bytes
) -> bytes:
    """What a client signs in ConsistencyCheck: the survivor set's digest, the key roster it
    was given (whose digest seeds the graph) and its partner set (a bitmap over its sorted
    graph neighbours, see partners_bitmap), so two clients told different stories about the
    roster or about who masked with whom can never count towards the same quorum."""
    return _pack(context, Stage.CONSISTENCY, survivors, roster, partners)


def roster_digest(context: bytes, entries: Iterable[tuple[str, bytes, bytes, bytes]]) -> bytes:
    """The digest of a key roster: (node, c_public, s_public, signature), sorted by node.

    It seeds the SecAgg+ graph (protocol.secagg.graph), so the graph follows from the
    clients' signed key advertisements rather than from a value the server picks.
    """
    # One length-prefixed record per entry, hashed in one call: every client hashes the
    # whole roster, so this runs n times per round in a one-process simulation.
    parts = [_pack("roster", context)]
    for node, c_public, s_public, signature in sorted(entries):
        raw = node.encode("utf-8")
        parts.append(
            b"%b%b%b%b%b%b%b%b"
            % (
                struct.pack(">H", len(raw)),
                raw,
                struct.pack(">H", len(c_public)),
                c_public,
                struct.pack(">H", len(s_public)),
                s_public,
                struct.pack(">H", len(signature)),
                signature,
            )
        )
    return hashlib.sha256(b"".join(parts)).digest()


def partners_bitmap(neighbours: Iterable[str], partners: Iterable[str]) -> bytes:
    """Bit i (little-endian within each byte) set iff sorted(neighbours)[i] is a partner."""
    chosen = set(partners)
    ordered = sorted(neighbours)
    out = bytearray((len(ordered) + 7) // 8)
    for i, v in enumerate(ordered):
        if v in chosen:
            out[i >> 3] |= 1 << (i & 7)
    return bytes(out)


def share_purpose(context: bytes) -> str:
    """The AEAD purpose of a ShareKeys ciphertext in the session of `context`."""
    return f"{SHARE_PURPOSE}/{context.hex()}"


def pair_info(purpose: str, context: bytes, u: str, v: str) -> bytes:
    """HKDF info for the key shared by u and v: symmetric in (u, v), bound to the session
    context and the key's use.

    Length-prefixed fields (unambiguous for any strings); built with one format because a
    round computes it for every edge of the graph.
    """
    a, b = (u, v) if u <= v else (v, u)
    ab, bb, pb = a.encode(), b.encode(), purpose.encode()
    return b"%b|%d:%b|%b|%d:%b|%d:%b" % (_DOMAIN, len(pb), pb, context, len(ab), ab, len(bb), bb)
