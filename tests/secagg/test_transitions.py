"""The transition tables are what the machines do: every step taken is in a table, every
message that is not in one is refused as data, without a state change."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from protocol.events import Refusal
from protocol.secagg.messages import (
    SECAGG_MESSAGES,
    AdvertisedKeys,
    SecAggAbort,
    SecAggParams,
)
from protocol.secagg.simulate import simulate_round
from protocol.secagg.transitions import (
    CLIENT_ENTERS,
    CLIENT_SENDS,
    CLIENT_TRANSITIONS,
    SERVER_TRANSITIONS,
    Outcome,
    advance,
)
from protocol.stages import SECAGG_STAGES, Stage
from protocol.tensors import from_numpy

from .conftest import MECHANICS, Driver

SEMI = SecAggParams(graph="complete", k=4, t=3, clip=1.0, malicious=False)
MAL = SecAggParams(graph="complete", k=4, t=3, clip=1.0, malicious=True)


def test_each_stage_collects_one_client_message_and_the_tables_agree_on_stages():
    assert [stage for stage, _ in SERVER_TRANSITIONS] == list(SECAGG_STAGES)
    for (stage, kind), _after in SERVER_TRANSITIONS.items():
        assert CLIENT_SENDS[kind] is stage  # the server collects what clients send in it
    # Every SecAgg message is either sent by clients or opens a stage at them (Abort: neither).
    assert set(CLIENT_SENDS) | set(CLIENT_ENTERS) | {SecAggAbort} == set(SECAGG_MESSAGES)
    assert not set(CLIENT_SENDS) & set(CLIENT_ENTERS)


@pytest.mark.parametrize("table", [CLIENT_TRANSITIONS, SERVER_TRANSITIONS])
def test_consistency_exists_only_in_malicious_mode(table):
    for (state, kind), after in table.items():
        assert advance(table, state, kind, malicious=True) is after
        expected = Stage.UNMASK if after is Stage.CONSISTENCY else after
        assert advance(table, state, kind, malicious=False) is expected


def _steps(drv: Driver) -> tuple[list[tuple[object, object]], list[tuple[object, object]]]:
    """Run the driver's honest round, noting every (before, after) state change."""
    client_steps: list[tuple[object, object]] = []
    server_steps: list[tuple[object, object]] = []
    before = {u: c.stage for u, c in drv.clients.items()}
    server_before = drv.server.stage
    outs = drv.start()
    while not drv.server.done:
        replies = drv.to_server(outs)
        if drv.server.stage != server_before:
            server_steps.append((server_before, drv.server.stage))
            server_before = drv.server.stage
        outs = drv.to_clients(replies)
        for u, c in drv.clients.items():
            if c.stage != before[u]:
                client_steps.append((before[u], c.stage))
                before[u] = c.stage
    return client_steps, server_steps


@pytest.mark.parametrize("params", [SEMI, MAL], ids=["semi-honest", "malicious"])
def test_an_honest_round_takes_only_steps_of_the_tables(params):
    drv = Driver(5, params)
    client_steps, server_steps = _steps(drv)
    malicious = params.malicious
    allowed_client = {
        (state, advance(CLIENT_TRANSITIONS, state, kind, malicious=malicious))
        for state, kind in CLIENT_TRANSITIONS
    }
    # The input is set before the shares arrive: MaskedInput leaves at once, so a client goes
    # from share_keys straight past masked_input within one message.
    allowed_client.add((Stage.SHARE_KEYS, Stage.CONSISTENCY if malicious else Stage.UNMASK))
    allowed_server = {
        (state, advance(SERVER_TRANSITIONS, state, kind, malicious=malicious))
        for state, kind in SERVER_TRANSITIONS
    }
    assert set(client_steps) <= allowed_client
    assert set(server_steps) <= allowed_server
    assert drv.server.stage is Outcome.DONE
    assert all(c.stage is Outcome.DONE for c in drv.clients.values())
    assert (drv.server.result == drv.expected(drv.server.survivors)).all()


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(SECAGG_MESSAGES),
    steps=st.integers(min_value=0, max_value=3),
    malicious=st.booleans(),
)
def test_a_message_outside_the_table_is_refused_as_data_without_a_state_change(
    kind, steps, malicious
):
    drv = Driver(5, MAL if malicious else SEMI)
    outs = drv.start()
    for _ in range(steps):  # advance the honest round a little
        if drv.server.done:
            break
        outs = drv.to_clients(drv.to_server(outs))
    client = drv.clients["envoy-1"]
    # Only messages the table has no step for (Abort is the one message valid everywhere).
    assume(not client.done and kind is not SecAggAbort)
    assume((client.stage, kind) not in CLIENT_TRANSITIONS)
    body = _some(kind, round=drv.round)
    stage = client.stage
    client.take_refusals()
    assert client.receive("director", body) == []
    assert client.stage == stage
    (refusal,) = client.take_refusals()
    assert isinstance(refusal, Refusal) and refusal.type == kind.__name__
    assert client.take_refusals() == []  # taken once

    server_stage = drv.server.stage
    if drv.server.done or (server_stage, kind) in SERVER_TRANSITIONS:
        return
    drv.server.take_refusals()
    assert drv.server.receive("envoy-2", body) == []
    assert drv.server.stage == server_stage
    assert [r.type for r in drv.server.take_refusals()] == [kind.__name__]


def _some(kind: type, *, round: int) -> object:
    """A well-formed instance of a SecAgg message type (its meaning does not matter here)."""
    fields = {
        "round": round,
        "keys": {},
        "ciphertexts": {},
        "masked": from_numpy(np.zeros(16, np.uint32)),
        "survivors": [],
        "dropouts": [],
        "signature": b"s" * 64,
        "self_mask_shares": {},
        "key_shares": {},
        "reason": "",
    }
    if kind.__name__ == "SecAggAdvertiseKeys":
        fields["keys"] = AdvertisedKeys(c_public=b"c" * 32, s_public=b"s" * 32)
    names = set(kind.__struct_fields__)
    return kind(**{k: v for k, v in fields.items() if k in names})


def test_a_dropout_schedule_stops_clients_where_the_tables_say_they_send():
    sim = simulate_round(
        n=6,
        params=SEMI,
        vector_length=8,
        dropouts={"envoy-1": "masked_input"},
        seed=3,
        policy=MECHANICS,
    )
    assert not sim.aborted and "envoy-1" not in sim.survivors
    sent = {type(body) for sender, body in sim.view if sender == "envoy-1"}
    assert {CLIENT_SENDS[k] for k in sent} == {Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS}
