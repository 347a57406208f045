"""Envoy contributions against the director's aggregations, in memory: the two halves of a
round meet exactly as over the bus, with no transport in between."""

from __future__ import annotations

import numpy as np
import pytest

from crypto.signing import generate_signing_keypair
from node.aggregation import PlainAggregation, SecureAggregation
from node.contribution import (
    ContributionError,
    LocalUpdate,
    PlainContribution,
    RoundRefused,
    SecureContribution,
    contribution_for,
)
from protocol.events import BROADCAST, Outgoing
from protocol.messages import PlainUpdate, RoundStart, TrainPlan
from protocol.secagg.messages import (
    SecAggAdvertiseKeys,
    SecAggKeyRoster,
    SecAggMaskedInput,
    SecAggParams,
)
from protocol.secagg.policy import ClientPolicy
from protocol.secagg.update import Layout, secagg_session
from protocol.stages import Stage
from protocol.tensors import state_from_numpy

NAMES = ["envoy-1", "envoy-2", "envoy-3", "envoy-4"]
WEIGHTS = {"conv.weight": np.zeros((2, 3), np.float32), "fc.bias": np.zeros(4, np.float32)}
LAYOUT = Layout.of(WEIGHTS)


def update(i: int) -> LocalUpdate:
    value = 0.05 * (i + 1)
    delta = {k: np.full(v.shape, value, np.float32) for k, v in WEIGHTS.items()}
    return LocalUpdate(delta=delta, num_samples=100 * (i + 1), train_loss=value)


def weighted_mean(updates: list[LocalUpdate]) -> tuple[dict[str, np.ndarray], float]:
    total = sum(u.num_samples for u in updates)
    mean = {
        k: sum(u.num_samples / total * u.delta[k].astype(np.float64) for u in updates)
        for k in WEIGHTS
    }
    return mean, sum(u.num_samples / total * u.train_loss for u in updates)


def deliver(
    outs: list[Outgoing], contributions: dict[str, SecureContribution]
) -> dict[str, list[Outgoing]]:
    """The director's messages to the envoys, and what each answers."""
    answers: dict[str, list[Outgoing]] = {}
    for out in outs:
        for name in NAMES if out.recipient == BROADCAST else [out.recipient]:
            answers.setdefault(name, []).extend(contributions[name].receive("director", out.body))
    return answers


@pytest.mark.parametrize("malicious", [False, True])
def test_secure_contributions_and_aggregation_compute_fedavg(malicious, tmp_path):
    params = SecAggParams(graph="complete", k=3, t=3, clip=1.0, malicious=malicious)
    # Semi-honest rounds are a protocol-benchmark opt-in; an envoy's policy never allows them.
    policy = ClientPolicy(insecure_semi_honest=not malicious)
    keys = {n: generate_signing_keypair() for n in NAMES}
    public = {n: k.public for n, k in keys.items()}
    session = secagg_session(2, 1)
    agg = SecureAggregation(
        round=session,
        participants=NAMES,
        layout=LAYOUT,
        min_survivors=3,
        params=params,
        client_signing_keys=public,
        federation="fedtest",
    )
    audited: dict[str, np.ndarray] = {}
    contributions = {
        n: SecureContribution(
            node_id=n,
            director_id="director",
            round=2,
            attempt=1,
            params=params,
            participants=NAMES,
            layout=LAYOUT,
            signing_key=keys[n].private,
            peer_signing_keys=public,
            federation="fedtest",
            policy=policy,
            audit=lambda v, n=n: audited.__setitem__(n, v),
        )
        for n in NAMES
    }
    pending = {n: c.start() for n, c in contributions.items()}
    assert all(isinstance(o.body, SecAggAdvertiseKeys) for outs in pending.values() for o in outs)
    # Training ends before the shares arrive: nothing to send yet, the input waits.
    for i, n in enumerate(NAMES):
        assert contributions[n].submit(update(i)) == []
        assert (
            contributions[n].entered_on(SecAggKeyRoster(round=session, keys={})) is Stage.SHARE_KEYS
        )
    while not agg.done:
        replies: list[Outgoing] = []
        for n, outs in pending.items():
            for out in outs:
                assert out.recipient == "director"
                replies += agg.receive(n, out.body)
        # The only refusals of an honest round: unmask responses after the sum was recovered.
        late = agg.take_refusals()
        assert all((r.type, r.reason) == ("SecAggUnmaskResponse", "server is done") for r in late)
        assert not late or agg.done
        pending = deliver(replies, contributions)
    assert agg.failure is None and all(c.done and not c.aborted for c in contributions.values())
    result = agg.result()
    assert result.survivors == NAMES and result.dropouts == []
    # The director's sum is the envoys' audited quantised vectors, bit for bit.
    assert np.array_equal(
        result.unmasked_sum, np.sum(list(audited.values()), axis=0, dtype=np.uint32)
    )
    mean, loss = weighted_mean([update(i) for i in range(len(NAMES))])
    for k in WEIGHTS:
        np.testing.assert_allclose(result.mean_delta[k], mean[k], atol=1e-6)
    assert result.train_loss == pytest.approx(loss, abs=1e-6)


def test_plain_contributions_and_aggregation_compute_fedavg():
    agg = PlainAggregation(NAMES, LAYOUT, min_survivors=2)
    for i, n in enumerate(NAMES):
        c = PlainContribution(director_id="director")
        assert c.start() == [] and not c.done
        (out,) = c.submit(update(i))
        assert out.recipient == "director" and isinstance(out.body, PlainUpdate)
        assert c.sent_in(out.body) is Stage.MASKED_INPUT and c.done
        with pytest.raises(ContributionError):
            c.submit(update(i))
        assert agg.receive(n, out.body) == [] and agg.take_refusals() == []
    result = agg.result()
    mean, loss = weighted_mean([update(i) for i in range(len(NAMES))])
    for k in WEIGHTS:
        np.testing.assert_allclose(result.mean_delta[k], mean[k], rtol=1e-6)
    assert result.train_loss == pytest.approx(loss)


def test_refusals_are_data_the_driver_takes():
    agg = PlainAggregation(NAMES, LAYOUT, min_survivors=2)
    (good,) = PlainContribution(director_id="director").submit(update(0))
    bad_shape = PlainUpdate(
        delta=state_from_numpy(
            {"conv.weight": np.zeros((3, 2), np.float32), "fc.bias": np.zeros(4, np.float32)}
        ),
        num_samples=5,
        train_loss=0.0,
    )
    assert agg.receive("mallory", good.body) == []
    assert agg.receive("envoy-1", bad_shape) == []
    assert agg.receive("envoy-1", good.body) == []
    assert agg.receive("envoy-1", good.body) == []
    reasons = [r.reason for r in agg.take_refusals()]
    assert reasons == [
        "mallory is not a participant",
        "tensor conv.weight has shape (3, 2), expected (2, 3)",
        "second update from envoy-1",
    ]
    assert agg.take_refusals() == []
    plain = PlainContribution(director_id="director")
    assert (
        plain.receive(
            "director",
            SecAggMaskedInput(round=1, masked=state_from_numpy({"x": np.zeros(2, np.uint32)})["x"]),
        )
        == []
    )
    assert [r.type for r in plain.take_refusals()] == ["SecAggMaskedInput"]


def test_a_plain_contribution_needs_the_envoys_own_opt_in():
    plan = TrainPlan(local_epochs=1, batch_size=1, lr=0.1)
    params = SecAggParams(graph="complete", k=3, t=4, clip=1.0, malicious=True)
    keys = {n: generate_signing_keypair() for n in NAMES}
    common = {
        "weights": state_from_numpy(WEIGHTS),
        "selected": NAMES,
        "plan": plan,
        "deadlines": {},
    }
    kw = {
        "round": 1,
        "node_id": "envoy-1",
        "director_id": "director",
        "layout": LAYOUT,
        "signing_key": keys["envoy-1"].private,
        "peer_signing_keys": {n: k.public for n, k in keys.items()},
    }
    secure = contribution_for(RoundStart(**common, secagg=params), **kw)
    assert isinstance(secure, SecureContribution) and secure.secure
    # The director asking for a plain update is not enough: the envoy must have opted in.
    with pytest.raises(RoundRefused, match="insecure_plain_updates"):
        contribution_for(RoundStart(**common), **kw)
    plain = contribution_for(RoundStart(**common), **kw, allow_plain=True)
    assert isinstance(plain, PlainContribution) and not plain.secure
