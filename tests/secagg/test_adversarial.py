"""A cheating server or peer, replays, wrong stages, thresholds: what must be refused."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from crypto.signing import generate_signing_keypair, sign
from protocol.secagg.client import SecAggClient, SecAggClientError
from protocol.secagg.common import (
    consistency_signing_payload,
    keys_signing_payload,
    survivors_digest,
)
from protocol.secagg.messages import (
    AdvertisedKeys,
    SecAggAbort,
    SecAggAdvertiseKeys,
    SecAggConsistencyRequest,
    SecAggForwardedShares,
    SecAggKeyRoster,
    SecAggParams,
    SecAggUnmaskRequest,
    SecAggUnmaskResponse,
)
from protocol.secagg.server import SecAggServer, SecAggServerError
from protocol.secagg.simulate import SERVER, node_names, simulate_round
from protocol.secagg.transitions import Outcome
from protocol.stages import Stage

from .conftest import MECHANICS, Driver, body_of

SEMI = SecAggParams(graph="complete", k=5, t=4, clip=1.0, malicious=False)
MAL = SecAggParams(graph="complete", k=5, t=4, clip=1.0, malicious=True)


def _run_to_unmask(drv: Driver, drop_at_masked: set[str] = frozenset()):
    """Drive an honest round up to the Unmask request; returns that request's replies."""
    replies = drv.to_server(drv.start())
    outs = drv.to_clients(replies)  # roster -> ShareKeys
    replies = drv.to_server(outs)
    outs = drv.to_clients(replies)  # forwarded shares -> MaskedInput
    outs = {u: m for u, m in outs.items() if u not in drop_at_masked}
    replies = drv.to_server(outs)
    if drv.params.malicious:
        outs = drv.to_clients(replies)  # consistency request -> signatures
        replies = drv.to_server(outs)
    return replies


# -- the rule: never both shares of one peer ------------------------------------------------


@pytest.mark.parametrize("params", [SEMI, MAL])
def test_overlapping_unmask_request_is_refused(params: SecAggParams) -> None:
    drv = Driver(6, params)
    replies = _run_to_unmask(drv, drop_at_masked={"envoy-6"})
    request = body_of(replies, SecAggUnmaskRequest)
    assert "envoy-6" in request.dropouts
    victim = drv.clients["envoy-1"]
    assert victim.stage == Stage.UNMASK
    # The cheating server also lists a survivor as a dropout, to get its key share as well.
    cheat = msgspec.structs.replace(request, dropouts=[*request.dropouts, "envoy-2"])
    assert victim.receive(SERVER, cheat) == []
    assert victim.refusals[-1].reason == "survivors and dropouts overlap"
    assert victim.stage == Stage.UNMASK  # refused without a state change
    # The honest request still works afterwards, and reveals one kind of share per peer.
    (out,) = victim.receive(SERVER, request)
    assert isinstance(out.body, SecAggUnmaskResponse)
    assert set(out.body.self_mask_shares) == set(request.survivors)
    assert set(out.body.key_shares) == {"envoy-6"}
    assert victim.stage == Outcome.DONE


def test_unmask_request_without_the_client_or_below_threshold_is_refused() -> None:
    drv = Driver(6, SEMI)
    replies = _run_to_unmask(drv)
    request = body_of(replies, SecAggUnmaskRequest)
    c = drv.clients["envoy-3"]
    not_me = msgspec.structs.replace(
        request, survivors=[u for u in request.survivors if u != "envoy-3"]
    )
    assert c.receive(SERVER, not_me) == []
    few = msgspec.structs.replace(request, survivors=["envoy-3", "envoy-4"], dropouts=[])
    assert c.receive(SERVER, few) == []
    assert c.stage == Stage.UNMASK and len(c.refusals) == 2


def test_server_result_after_dropout_at_masked_input() -> None:
    drv = Driver(6, MAL)
    replies = _run_to_unmask(drv, drop_at_masked={"envoy-2"})
    outs = drv.to_clients(replies)
    drv.to_server(outs)
    assert drv.server.stage == Outcome.DONE
    assert drv.server.survivors == frozenset(drv.names) - {"envoy-2"}
    np.testing.assert_array_equal(drv.server.result, drv.expected(drv.server.survivors))


# -- thresholds ------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["advertise_keys", "share_keys", "masked_input", "unmask"])
def test_below_threshold_aborts_cleanly(stage: str) -> None:
    params = SecAggParams(graph="complete", k=5, t=5, clip=1.0, malicious=False)
    sim = simulate_round(
        n=6,
        params=params,
        vector_length=8,
        dropouts={"envoy-1": stage, "envoy-2": stage},
        policy=MECHANICS,
    )
    assert sim.aborted and sim.result is None
    # Every client that was still there heard the abort and revealed nothing afterwards.
    for u, c in sim.clients.items():
        if u not in ("envoy-1", "envoy-2"):
            assert c.stage in (Outcome.ABORTED, Outcome.DONE)
    if stage != "unmask":
        assert not any(isinstance(b, SecAggUnmaskResponse) for _, b in sim.view)


def test_dropout_before_share_keys_is_excluded_not_an_abort() -> None:
    params = SecAggParams(graph="complete", k=5, t=4, clip=1.0, malicious=True)
    sim = simulate_round(
        n=6,
        params=params,
        vector_length=8,
        dropouts={"envoy-1": "advertise_keys", "envoy-2": "share_keys"},
        # (the default policy would refuse: 3 partners of 5 is below (1 - 0.34) k)
        policy=MECHANICS,
    )
    assert not sim.aborted
    assert sim.survivors == frozenset(node_names(6)) - {"envoy-1", "envoy-2"}
    np.testing.assert_array_equal(sim.result, sim.expected)


def test_harary_client_with_thin_neighbourhood_is_pruned_not_fatal() -> None:
    # k = 6, t = 3 on a ring of 16: five of w's six neighbours drop before ShareKeys, so w's
    # shares have 2 holders left (itself and one neighbour), below t: w is excluded, and the
    # round completes without it (every other client keeps at least 3 holders). The graph is
    # only known once the roster is (its digest seeds it), so the dropouts are picked then.
    params = SecAggParams(graph="harary", k=6, t=3, clip=1.0, malicious=False)
    drv = Driver(16, params, round=1)
    replies = drv.to_server(drv.start())
    ring = drv.server.graph.ring
    w = ring[0]
    gone = {ring[-3], ring[-2], ring[-1], ring[1], ring[2]}
    outs = {u: m for u, m in drv.to_clients(replies).items() if u not in gone}
    replies = drv.to_server(outs)  # ShareKeys closes: w cannot reach t holders
    assert w not in drv.server._u2
    outs = drv.to_clients(replies)
    replies = drv.to_server(outs)
    outs = drv.to_clients(replies)
    drv.to_server(outs)
    assert drv.server.stage == Outcome.DONE, drv.server.abort_reason
    assert drv.server.survivors == frozenset(drv.names) - gone - {w}
    np.testing.assert_array_equal(drv.server.result, drv.expected(drv.server.survivors))


# -- wrong stage, wrong round, replays ---------------------------------------------------


def test_wrong_stage_and_wrong_round_are_refused_without_state_change() -> None:
    drv = Driver(5, SEMI)
    outs = drv.start()
    adv = outs["envoy-1"][0].body
    assert isinstance(adv, SecAggAdvertiseKeys)
    # Server: a message from the future stage, and one from another round.
    early = SecAggUnmaskResponse(round=drv.round, self_mask_shares={}, key_shares={})
    assert drv.server.receive("envoy-1", early) == []
    stale = msgspec.structs.replace(adv, round=drv.round - 1)
    assert drv.server.receive("envoy-1", stale) == []
    assert drv.server.stage == "advertise_keys" and len(drv.server.refusals) == 2
    # ... and from a stranger.
    assert drv.server.receive("mallory", adv) == []
    # Client: an Unmask request before it has even shared keys; a roster for another round.
    c = drv.clients["envoy-2"]
    request = SecAggUnmaskRequest(round=drv.round, survivors=drv.names, dropouts=[])
    assert c.receive(SERVER, request) == []
    roster = SecAggKeyRoster(round=drv.round + 1, keys={})
    assert c.receive(SERVER, roster) == []
    # Only the server drives the client.
    assert c.receive("envoy-3", SecAggAbort(round=drv.round)) == []
    assert c.stage == "advertise_keys" and not c.aborted


def test_replayed_messages_are_idempotent() -> None:
    drv = Driver(5, SEMI)
    outs = drv.start()
    replies = []
    for u, msgs in outs.items():
        for out in msgs:
            replies += drv.server.receive(u, out.body)
            assert drv.server.receive(u, out.body) == []  # duplicate: nothing, no change
    roster = body_of(replies, SecAggKeyRoster)
    c = drv.clients["envoy-1"]
    first = c.receive(SERVER, roster)
    assert len(first) == 1
    assert c.receive(SERVER, roster) == []  # replayed roster: no second set of shares
    assert c.stage == "share_keys"


def test_replay_from_an_earlier_round_is_refused() -> None:
    old = Driver(5, SEMI, round=3, seed=1)
    replies = _run_to_unmask(old)
    old_request = body_of(replies, SecAggUnmaskRequest)
    new = Driver(5, SEMI, round=4, seed=2)
    _run_to_unmask(new)
    c = new.clients["envoy-1"]
    assert c.receive(SERVER, old_request) == []
    assert "round" in c.refusals[-1].reason and c.stage == Stage.UNMASK


def test_set_input_after_shares_sends_masked_input() -> None:
    drv = Driver(4, SEMI)
    late = SecAggClient(
        "envoy-1",
        drv.round,
        SEMI,
        drv.names,
        server_id=SERVER,
        federation=drv.federation,
        policy=MECHANICS,
    )  # a client without input yet
    drv.clients["envoy-1"] = late
    replies = drv.to_server(drv.start())
    outs = drv.to_clients(replies)
    replies = drv.to_server(outs)
    outs = drv.to_clients(replies)
    assert "envoy-1" not in outs or outs["envoy-1"] == []
    assert late.stage == Stage.MASKED_INPUT
    (out,) = late.set_input(drv.inputs["envoy-1"])
    outs["envoy-1"] = [out]
    replies = drv.to_server(outs)
    drv.to_server(drv.to_clients(replies))
    np.testing.assert_array_equal(drv.server.result, drv.expected(frozenset(drv.names)))


# -- malicious mode: signatures ------------------------------------------------------------


def test_forged_advertise_keys_signature_is_refused_by_server() -> None:
    drv = Driver(6, MAL)
    outs = drv.start()
    adv = outs["envoy-1"][0].body
    mallory = generate_signing_keypair()
    forged_sig = sign(
        mallory.private,
        keys_signing_payload(drv.server.context, "envoy-1", adv.keys.c_public, adv.keys.s_public),
    )
    forged = msgspec.structs.replace(
        adv, keys=msgspec.structs.replace(adv.keys, signature=forged_sig)
    )
    assert drv.server.receive("envoy-1", forged) == []
    assert drv.server.refusals[-1].reason == "invalid signature on the keys"
    # The genuine one is still accepted.
    assert drv.server.receive("envoy-1", adv) == []
    assert "envoy-1" in drv.server._keys


def test_forged_key_in_roster_aborts_client() -> None:
    drv = Driver(5, MAL)
    replies = drv.to_server(drv.start())
    roster = body_of(replies, SecAggKeyRoster)
    # The server swaps in its own key for envoy-2, signed with a key it made up.
    mallory = generate_signing_keypair()
    fake = AdvertisedKeys(c_public=bytes(range(32)), s_public=bytes(range(1, 33)))
    fake = msgspec.structs.replace(
        fake,
        signature=sign(
            mallory.private,
            keys_signing_payload(drv.server.context, "envoy-2", fake.c_public, fake.s_public),
        ),
    )
    keys = dict(roster.keys)
    keys["envoy-2"] = fake
    c = drv.clients["envoy-1"]
    assert c.receive(SERVER, SecAggKeyRoster(round=drv.round, keys=keys)) == []
    assert c.aborted and "invalid signature" in c.abort_reason


def test_roster_reflecting_own_key_aborts_client() -> None:
    drv = Driver(5, SEMI)
    replies = drv.to_server(drv.start())
    roster = body_of(replies, SecAggKeyRoster)
    keys = dict(roster.keys)
    keys["envoy-2"] = keys["envoy-1"]  # envoy-1 would encrypt its shares to itself
    c = drv.clients["envoy-1"]
    assert c.receive(SERVER, SecAggKeyRoster(round=drv.round, keys=keys)) == []
    assert c.aborted and "repeats a public key" in c.abort_reason


def test_tampered_ciphertext_aborts_client() -> None:
    drv = Driver(5, SEMI)
    replies = drv.to_server(drv.start())
    replies = drv.to_server(drv.to_clients(replies))
    fwd = next(
        o.body
        for o in replies
        if o.recipient == "envoy-1" and isinstance(o.body, SecAggForwardedShares)
    )
    sender, ct = next(iter(fwd.ciphertexts.items()))
    bad = dict(fwd.ciphertexts)
    bad[sender] = ct[:-1] + bytes([ct[-1] ^ 1])
    c = drv.clients["envoy-1"]
    assert c.receive(SERVER, SecAggForwardedShares(round=drv.round, ciphertexts=bad)) == []
    assert c.aborted and "do not decrypt" in c.abort_reason


def test_forged_consistency_signature_is_refused() -> None:
    drv = Driver(6, MAL)
    replies = drv.to_server(drv.start())
    replies = drv.to_server(drv.to_clients(replies))
    replies = drv.to_server(drv.to_clients(replies))
    request = body_of(replies, SecAggConsistencyRequest)
    assert drv.server.stage == Stage.CONSISTENCY
    mallory = generate_signing_keypair()
    genuine = drv.clients["envoy-3"].receive(SERVER, request)[0].body
    payload = consistency_signing_payload(
        drv.server.context,
        survivors_digest(request.survivors),
        drv.server._roster_digest,
        genuine.partners,
    )
    forged = msgspec.structs.replace(genuine, signature=sign(mallory.private, payload))
    assert drv.server.receive("envoy-3", forged) == []
    assert drv.server.refusals[-1].reason == "invalid signature on the survivor set"


def test_unmask_request_with_forged_signatures_is_refused_by_client() -> None:
    drv = Driver(6, MAL)
    replies = _run_to_unmask(drv)
    request = body_of(replies, SecAggUnmaskRequest)
    mallory = generate_signing_keypair()
    forged = {
        u: sign(
            mallory.private,
            consistency_signing_payload(
                drv.server.context,
                survivors_digest(request.survivors),
                drv.server._roster_digest,
                request.partners[u],
            ),
        )
        for u in request.signatures
    }
    c = drv.clients["envoy-1"]
    bad = msgspec.structs.replace(request, signatures=forged)
    assert c.receive(SERVER, bad) == []
    assert "signatures" in c.refusals[-1].reason and c.stage == Stage.UNMASK
    (out,) = c.receive(SERVER, request)  # the genuine request still goes through
    assert isinstance(out.body, SecAggUnmaskResponse)


def test_equivocating_server_cannot_collect_both_shares() -> None:
    """The server tells half the clients that envoy-6 survived and the other half that it
    dropped, hoping to get envoy-6's self-mask shares from one half and its key shares from
    the other. Honest clients sign one survivor set each, so neither story gathers t
    signatures: every client refuses to unmask and nothing of envoy-6 leaks."""
    params = SecAggParams(graph="complete", k=7, t=5, clip=1.0, malicious=True)
    drv = Driver(8, params)
    replies = drv.to_server(drv.start())
    replies = drv.to_server(drv.to_clients(replies))
    outs = drv.to_clients(replies)  # masked inputs of everybody, unused by the cheat
    everyone = sorted(drv.names)
    story_a = everyone  # envoy-6 survived
    story_b = [u for u in everyone if u != "envoy-6"]  # envoy-6 dropped
    half_a = set(everyone[:4])
    half_b = set(everyone[4:]) - {"envoy-6"}
    sigs_a: dict[str, bytes] = {}
    sigs_b: dict[str, bytes] = {}
    bits: dict[str, bytes] = {}
    for u in half_a:
        (o,) = drv.clients[u].receive(
            SERVER, SecAggConsistencyRequest(round=drv.round, survivors=story_a)
        )
        sigs_a[u], bits[u] = o.body.signature, o.body.partners
    for u in half_b:
        (o,) = drv.clients[u].receive(
            SERVER, SecAggConsistencyRequest(round=drv.round, survivors=story_b)
        )
        sigs_b[u], bits[u] = o.body.signature, o.body.partners
    assert outs  # (masked inputs were produced)
    revealed_b: set[str] = set()
    revealed_s: set[str] = set()
    for u in half_a:
        req = SecAggUnmaskRequest(
            round=drv.round, survivors=story_a, dropouts=[], signatures=sigs_a, partners=bits
        )
        for o in drv.clients[u].receive(SERVER, req):
            revealed_b |= set(o.body.self_mask_shares)
    for u in half_b:
        req = SecAggUnmaskRequest(
            round=drv.round,
            survivors=story_b,
            dropouts=["envoy-6"],
            signatures=sigs_b,
            partners=bits,
        )
        for o in drv.clients[u].receive(SERVER, req):
            revealed_s |= set(o.body.key_shares)
    assert "envoy-6" not in revealed_b or "envoy-6" not in revealed_s
    assert not revealed_b and not revealed_s  # 4 and 3 signatures, both below t = 5


def test_construction_errors_name_the_field() -> None:
    names = node_names(4)
    with pytest.raises(SecAggClientError, match="signing_key"):
        SecAggClient("envoy-1", 1, MAL, names)
    with pytest.raises(SecAggClientError, match="node_id"):
        SecAggClient("nobody", 1, SEMI, names, policy=MECHANICS)
    with pytest.raises(SecAggServerError, match="client_signing_keys"):
        SecAggServer(1, MAL, names, 10)
    with pytest.raises(SecAggServerError, match=r"params\.t"):
        SecAggServer(
            1, SecAggParams(graph="complete", k=3, t=9, clip=1.0, malicious=False), names, 10
        )
    c = SecAggClient("envoy-1", 1, SEMI, names, policy=MECHANICS)
    with pytest.raises(SecAggClientError, match="vector"):
        c.set_input(np.zeros(3, dtype=np.float32))
