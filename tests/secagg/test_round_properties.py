"""Whole rounds under random n, graphs, thresholds, dropout schedules and duplicated messages.

The one acceptable outcome besides the exact sum of the survivors' inputs (mod 2^32) is a
clean abort; and whatever happens, the server's view must not contain any single input.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.secagg.graph import Graph, build_graph
from protocol.secagg.messages import (
    SecAggMaskedInput,
    SecAggParams,
    SecAggUnmaskResponse,
)
from protocol.secagg.simulate import node_names, seeded_randbytes, simulate_round
from protocol.stages import SECAGG_STAGES
from protocol.tensors import to_numpy

from .conftest import MECHANICS

D = 48  # vector length: enough coordinates for the privacy checks, small enough to be quick


@st.composite
def rounds(draw: st.DrawFn) -> dict:
    n = draw(st.integers(3, 40))
    malicious = draw(st.booleans())
    graph = draw(st.sampled_from(["complete", "harary"]))
    k = n - 1 if graph == "complete" else draw(st.integers(2, max(2, n - 2)))
    holders = min(k, n - 1) + 1
    lo = holders // 2 + 1 if malicious else 1
    t = draw(st.integers(min(lo, holders), holders))
    params = SecAggParams(graph=graph, k=k, t=t, clip=1.0, malicious=malicious)
    names = node_names(n)
    drop_p = draw(st.sampled_from([0.0, 0.1, 0.3, 0.6]))
    dropouts = {}
    for u in names:
        if draw(st.floats(0, 1)) < drop_p:
            dropouts[u] = draw(st.sampled_from(SECAGG_STAGES))
    return {
        "n": n,
        "params": params,
        "dropouts": dropouts,
        "duplicate": draw(st.sampled_from([0.0, 0.2, 1.0])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _structured_inputs(n: int, seed: int) -> dict[str, np.ndarray]:
    # Small, structured values (like quantised updates near the offset): if masking failed,
    # equality and correlation with the masked vectors would show at once.
    gen = np.random.default_rng(seed)
    base = np.arange(D, dtype=np.uint32) * 1000
    return {
        u: (base + gen.integers(0, 50, D).astype(np.uint32) + np.uint32(2**31))
        for u in node_names(n)
    }


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(rounds())
def test_result_is_survivor_sum_or_clean_abort(case: dict) -> None:
    n, params, dropouts = case["n"], case["params"], case["dropouts"]
    inputs = _structured_inputs(n, case["seed"])
    sim = simulate_round(
        n=n,
        params=params,
        vector_length=D,
        inputs=inputs,
        dropouts=dropouts,
        duplicate=case["duplicate"],
        seed=case["seed"],
        randbytes=seeded_randbytes(case["seed"]),
        policy=MECHANICS,
    )
    server = sim.server
    assert server is not None and server.done

    # Whoever crashed before sending its masked input cannot be in the sum.
    early = {
        u
        for u, s in dropouts.items()
        if SECAGG_STAGES.index(s) <= SECAGG_STAGES.index("masked_input")
    }
    # Who must be in the sum, worked out here from the schedule and the public graph alone.
    # The graph is seeded by the digest of the admitted key roster (issue #11), so it exists
    # only once keys were advertised; every client derives the same one from the roster.
    graph = server._graph
    if graph is None:
        advertised = {u for u in node_names(n) if dropouts.get(u) != "advertise_keys"}
        assert sim.aborted and len(advertised) < params.t
    in_sum = _reference_survivors(n, params, dropouts, graph)
    if in_sum is None:
        assert sim.aborted  # too few were left before the masked inputs
    if sim.aborted:
        assert sim.result is None and server.abort_reason
    else:
        assert sim.result is not None and in_sum is not None
        assert set(sim.survivors) == in_sum and not (in_sum & early)
        assert len(in_sum) >= params.t
        want = np.zeros(D, dtype=np.uint32)
        for u in sorted(in_sum):
            want += inputs[u]  # the test's own inputs, summed mod 2^32
        np.testing.assert_array_equal(sim.result, want)

    # Success is not optional: on the complete graph the round must complete exactly when
    # at least t clients stay to the end (they are the ones who can answer Unmask) and the
    # survivors are the majority the clients insist on.
    if params.graph == "complete" or params.k >= n - 1:
        late_stages = {"unmask"} | ({"consistency"} if params.malicious else set())
        to_end = {u for u in node_names(n) if u not in early and dropouts.get(u) not in late_stages}
        survivors = {u for u in node_names(n) if u not in early}
        fails = len(to_end) < params.t or len(survivors) < MECHANICS.min_survivors(params, n)
        assert sim.aborted == fails, (to_end, sim.abort_reason)

    _check_view(sim, params, inputs)


def _reference_survivors(
    n: int, params: SecAggParams, dropouts: dict, graph: Graph | None
) -> set[str] | None:
    """The clients whose inputs a completed round must sum, or None if it must abort before
    the masked inputs: Bonawitz et al.'s U1 > U2 > U3, with SecAgg+'s rule that a client
    whose neighbourhood (itself included) among the remaining clients is below t is excluded.
    """
    names = node_names(n)
    if graph is None:
        return None

    def without_weak_neighbourhoods(members: set[str]) -> set[str]:
        while True:
            weak = {u for u in members if len(graph.closed(u) & members) < params.t}
            if not weak:
                return members
            members = members - weak

    u1 = without_weak_neighbourhoods({u for u in names if dropouts.get(u) != "advertise_keys"})
    if len(u1) < params.t:
        return None
    u2 = without_weak_neighbourhoods({u for u in u1 if dropouts.get(u) != "share_keys"})
    if len(u2) < params.t:
        return None
    u3 = {u for u in u2 if dropouts.get(u) != "masked_input"}
    return u3 if len(u3) >= params.t else None


def _check_view(sim, params: SecAggParams, inputs: dict[str, np.ndarray]) -> None:
    """Nothing in the server's view equals or correlates with one input; no double reveal."""
    masked = [to_numpy(b.masked) for _, b in sim.view if isinstance(b, SecAggMaskedInput)]
    xs = np.stack(list(inputs.values())).astype(np.float64)
    for y in masked:
        for x in inputs.values():
            assert not np.array_equal(y, x)
            # Masked coordinates are uniform on Z_2^32: at most a coincidence or two match.
            assert np.count_nonzero(y == x) <= 2
        yc = y.astype(np.float64) - y.mean()
        xc = xs - xs.mean(axis=1, keepdims=True)
        corr = (xc @ yc) / (np.linalg.norm(xc, axis=1) * np.linalg.norm(yc) + 1e-300)
        # Inputs are ramps (correlation 1 with each other); 48 uniform coordinates give
        # |corr| < 0.75 with probability 1 - 1e-8.
        assert np.all(np.abs(corr) < 0.75), corr
    # Bytes anywhere in the view never contain an input verbatim.
    for _, body in sim.view:
        if isinstance(body, SecAggMaskedInput):
            raw = body.masked.data
            for x in inputs.values():
                assert x.tobytes() != raw
    # The core invariant: for no client did anybody reveal both its self-mask share and its
    # mask-key share.
    b_revealed: set[str] = set()
    s_revealed: set[str] = set()
    for _, body in sim.view:
        if isinstance(body, SecAggUnmaskResponse):
            b_revealed |= set(body.self_mask_shares)
            s_revealed |= set(body.key_shares)
    assert not (b_revealed & s_revealed)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(3, 60),
    k=st.integers(2, 30),
    round=st.integers(0, 1000),
    seed=st.binary(max_size=16),
)
def test_harary_graph_is_regular_symmetric_and_public(
    n: int, k: int, round: int, seed: bytes
) -> None:
    names = node_names(n)
    g = build_graph(names, kind="harary", k=k, round=round, graph_seed=seed)
    again = build_graph(list(reversed(names)), kind="harary", k=k, round=round, graph_seed=seed)
    degrees = []
    for u in names:
        nb = g.neighbours(u)
        assert u not in nb
        assert nb == again.neighbours(u)  # any party derives the same graph
        for v in nb:
            assert u in g.neighbours(v)  # symmetric
            assert g.sign(u, v) == -g.sign(v, u)
        degrees.append(len(nb))
    expect = min(k, n - 1)
    if expect == n - 1 or k % 2 == 0 or n % 2 == 0:
        assert set(degrees) == {expect}
    else:  # odd k, odd n: the Harary construction gives one vertex degree k + 1
        assert sorted(degrees)[:-1] == [expect] * (n - 1) and degrees.count(k + 1) == 1
    # Connected (a ring with chords).
    seen, todo = {names[0]}, [names[0]]
    while todo:
        for v in g.neighbours(todo.pop()):
            if v not in seen:
                seen.add(v)
                todo.append(v)
    assert len(seen) == n
    # x-coordinates: distinct, never 0.
    assert sorted(g.x(u) for u in names) == list(range(1, n + 1))


def test_graph_depends_on_seed_and_round() -> None:
    names = node_names(40)
    a = build_graph(names, kind="harary", k=4, round=1, graph_seed=b"a")
    b = build_graph(names, kind="harary", k=4, round=1, graph_seed=b"b")
    c = build_graph(names, kind="harary", k=4, round=2, graph_seed=b"a")
    na = [a.neighbours(u) for u in names]
    assert na != [b.neighbours(u) for u in names]
    assert na != [c.neighbours(u) for u in names]
