"""The ZeroMQ broker's session core, in memory: (peer, parts) events in, actions out.

No sockets and no clock: time is an argument, so heartbeat expiry, wills and the ACL are
tested event by event, and a hypothesis state machine drives random event sequences against
a plain model of the rules (sessions, subscriptions, retained frames, wills), which checks the
core's caches (routes, publish-ACL memo) never serve a stale answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from broker import zmq_commands as commands
from broker.keys import generate_curve_keypair
from broker.server.core import (
    MAX_FILTERS_PER_SESSION,
    BrokerCore,
    Log,
    NodeIdentity,
    Send,
    parse_allow_list,
)
from broker.topics import Topics, acl_allows, topic_matches
from tests.broker.broker_testkit import hello_parts as hello

FED = "core"
T = Topics(FED)
KEYS = {name: generate_curve_keypair().public for name in ("director", "e1", "e2", "stranger")}
ALLOW = {
    KEYS["director"]: NodeIdentity("director", "director"),
    KEYS["e1"]: NodeIdentity("e1", "envoy"),
    KEYS["e2"]: NodeIdentity("e2", "envoy"),
}
TIMEOUT = 5.0


def core(*, insecure: bool = False, max_frame: int = 1000, **queues: int) -> BrokerCore:
    return BrokerCore(
        federation=FED,
        allow=None if insecure else ALLOW,
        max_frame_bytes=max_frame,
        heartbeat_ivl_s=1.0,
        heartbeat_timeout_s=TIMEOUT,
        **queues,
    )


def pub(topic: str, payload: bytes, *, retain: bool = False) -> list[bytes]:
    return [
        commands.PUB,
        topic.encode(),
        commands.RETAIN_FLAGS if retain else commands.NO_FLAGS,
        payload,
    ]


def sends(actions: list) -> list[Send]:
    return [a for a in actions if isinstance(a, Send)]


def logs(actions: list) -> list[Log]:
    return [a for a in actions if isinstance(a, Log)]


def replies(actions: list, peer: bytes) -> list[tuple]:
    return [s.parts for s in sends(actions) if s.peers == (peer,) and not s.routed]


def routed(actions: list) -> list[Send]:
    return [s for s in sends(actions) if s.routed]


def join(c: BrokerCore, peer: bytes, node: str, *, now: float = 0.0, will=None) -> list:
    role = ALLOW[KEYS[node]].role
    out = c.receive(peer, hello(node, role, will), user_id=KEYS[node], now=now)
    welcome = (
        commands.WELCOME,
        node.encode(),
        role.encode(),
        b"1000",
        str(c.max_frame_bytes).encode(),
    )
    assert welcome in replies(out, peer)
    return out


def subscribe(c: BrokerCore, peer: bytes, node: str, topic_filter: str, *, now: float = 0.0):
    out = c.receive(peer, [commands.SUB, b"r", topic_filter.encode()], user_id=KEYS[node], now=now)
    return out


# -- authentication and HELLO ---------------------------------------------------------------


def test_unknown_key_gets_nothing_and_changes_nothing() -> None:
    c = core()
    for parts in (hello("e1", "envoy"), pub(T.director, b"x"), [commands.PING]):
        assert c.receive(b"p", parts, user_id=KEYS["stranger"], now=0.0) == []
        assert c.receive(b"p", parts, user_id=None, now=0.0) == []
    assert c.peers == ()


def test_the_key_decides_the_identity_not_the_hello() -> None:
    c = core()
    join(c, b"p", "e1")
    assert c.session_of(b"p") == ("e1", "envoy")
    out = c.receive(b"q", hello("director", "director"), user_id=KEYS["e1"], now=0.0)
    (err,) = replies(out, b"q")
    assert err[:2] == (commands.ERR, commands.HELLO)
    assert b"registered as envoy e1" in err[3]
    assert c.session_of(b"q") == ("e1", "envoy")  # still e1, whatever it claimed


def test_a_known_key_without_hello_is_asked_to_resync_and_served() -> None:
    c = core()
    subscribe(c, b"d", "director", T.director)
    out = c.receive(b"p", pub(T.director, b"x"), user_id=KEYS["e1"], now=0.0)
    assert replies(out, b"p")[0] == (commands.RESYNC,)
    # The frame itself is still routed: the session was opened from the authenticated key.
    assert [(s.peers, s.parts[2]) for s in routed(out)] == [((b"d",), b"x")]


def test_insecure_mode_believes_the_hello_and_nothing_before_it() -> None:
    c = core(insecure=True)
    out = c.receive(b"p", pub(T.director, b"x"), user_id=None, now=0.0)
    assert replies(out, b"p") == [(commands.RESYNC,)] and c.peers == ()
    out = c.receive(b"p", hello("bad/id", "envoy"), user_id=None, now=0.0)
    assert replies(out, b"p")[0][:2] == (commands.ERR, commands.HELLO) and c.peers == ()
    out = c.receive(b"p", hello("e9", "admin"), user_id=None, now=0.0)
    assert replies(out, b"p") == [(commands.ERR, commands.HELLO, b"", b"unknown role")]
    out = c.receive(b"p", hello("e9", "envoy"), user_id=None, now=0.0)
    assert replies(out, b"p")[0][0] == commands.WELCOME and c.session_of(b"p") == ("e9", "envoy")


def test_a_new_key_on_an_old_routing_id_replaces_the_session_and_fires_its_will() -> None:
    c = core()
    subscribe(c, b"d", "director", T.presence_filter)
    join(c, b"p", "e1", will=(T.presence("e1"), b"gone"))
    out = c.receive(b"p", [commands.PING], user_id=KEYS["e2"], now=1.0)
    assert c.session_of(b"p") == ("e2", "envoy")
    assert [(s.peers, s.parts[1:]) for s in routed(out)] == [
        ((b"d",), (T.presence("e1").encode(), b"gone"))
    ]


def test_a_will_outside_the_acl_is_refused() -> None:
    c = core()
    out = c.receive(
        b"p", hello("e1", "envoy", (T.presence("e2"), b"x")), user_id=KEYS["e1"], now=0.0
    )
    (err,) = replies(out, b"p")
    assert err[:3] == (commands.ERR, commands.HELLO, T.presence("e2").encode())
    assert [entry.event for entry in logs(out)] == ["will_refused"]


def test_malformed_commands_are_answered_not_raised() -> None:
    c = core()
    join(c, b"p", "e1")
    for parts in ([b"NOPE"], [commands.PUB, b"only-topic"], [commands.SUB, b"r"], [b""]):
        out = c.receive(b"p", parts, user_id=KEYS["e1"], now=0.0)
        assert replies(out, b"p")[0][0] == commands.ERR
    assert c.receive(b"p", [], user_id=KEYS["e1"], now=0.0) == []


# -- publish and subscribe ------------------------------------------------------------------


def test_publish_is_checked_against_the_acl_and_the_size_limit() -> None:
    c = core(max_frame=10)
    join(c, b"p", "e1")
    out = c.receive(b"p", pub(T.envoy("e2"), b"x"), user_id=KEYS["e1"], now=0.0)
    assert replies(out, b"p") == [
        (commands.ERR, commands.PUB, T.envoy("e2").encode(), b"not allowed by the ACL")
    ]
    out = c.receive(b"p", pub(T.director, b"x" * 11), user_id=KEYS["e1"], now=0.0)
    (err,) = replies(out, b"p")
    assert b"over the limit of 10" in err[3]
    assert c.stats["refused"] == 2 and c.stats["published"] == 0


def test_payloads_pass_through_untouched() -> None:
    class Frame:
        """Stands in for a zmq.Frame: the core may take len() of it, nothing else."""

        def __len__(self) -> int:
            return 3

    c = core()
    subscribe(c, b"d", "director", T.director)
    payload = Frame()
    out = c.receive(
        b"p",
        [commands.PUB, T.director.encode(), commands.NO_FLAGS, payload],
        user_id=KEYS["e1"],
        now=0.0,
    )
    (send,) = routed(out)
    assert send.parts[2] is payload


def test_subscriptions_outside_the_acl_are_refused() -> None:
    c = core()
    for topic_filter in ("#", T.envoy("e2"), "fedbus/other/broadcast", "a/#/b"):
        out = subscribe(c, b"p", "e1", topic_filter)
        (ack,) = [r for r in replies(out, b"p") if r[0] == commands.SUBACK]
        assert ack[2] == commands.REFUSED, topic_filter
    assert c.subscriptions(b"p") == frozenset()


def test_retained_frames_reach_new_subscribers_tagged_with_their_request() -> None:
    c = core()
    join(c, b"p", "e1")
    join(c, b"d", "director")
    c.receive(b"p", pub(T.presence("e1"), b"online", retain=True), user_id=KEYS["e1"], now=0.0)
    out = c.receive(
        b"d", [commands.SUB, b"req7", T.presence_filter.encode()], user_id=KEYS["director"], now=0.0
    )
    assert replies(out, b"d") == [
        (commands.SUBACK, b"req7", commands.OK, b""),
        (commands.MSG, T.presence("e1").encode(), b"online", b"req7"),
    ]
    # An empty retained frame clears the topic (MQTT).
    c.receive(b"p", pub(T.presence("e1"), b"", retain=True), user_id=KEYS["e1"], now=0.0)
    assert c.retained() == {}


def test_routes_follow_subscribe_and_unsubscribe() -> None:
    c = core()
    join(c, b"p", "e1")
    subscribe(c, b"d", "director", T.director)
    first = routed(c.receive(b"p", pub(T.director, b"1"), user_id=KEYS["e1"], now=0.0))
    c.receive(b"d", [commands.UNSUB, b"r", T.director.encode()], user_id=KEYS["director"], now=0.0)
    second = routed(c.receive(b"p", pub(T.director, b"2"), user_id=KEYS["e1"], now=0.0))
    assert [s.peers for s in first] == [(b"d",)] and second == []


def test_the_filter_count_per_session_is_bounded() -> None:
    c = BrokerCore(
        federation=FED, allow=None, max_frame_bytes=10, heartbeat_ivl_s=1, heartbeat_timeout_s=2
    )
    c.receive(b"p", hello("d", "director"), user_id=None, now=0.0)
    # The director may subscribe to presence/<anything>: one filter per envoy id.
    for i in range(MAX_FILTERS_PER_SESSION):
        c.receive(b"p", [commands.SUB, b"r", T.presence(f"e{i}").encode()], user_id=None, now=0)
    out = c.receive(
        b"p", [commands.SUB, b"r", T.presence("one-more").encode()], user_id=None, now=0
    )
    assert replies(out, b"p")[0][2] == commands.REFUSED
    assert len(c.subscriptions(b"p")) == MAX_FILTERS_PER_SESSION


# -- liveness, wills, queues ----------------------------------------------------------------


def test_wills_fire_on_timeout_and_disconnect_but_not_on_bye() -> None:
    for ending in ("timeout", "unreachable", "bye"):
        c = core()
        subscribe(c, b"d", "director", T.presence_filter, now=0.0)
        join(c, b"p", "e1", will=(T.presence("e1"), b"gone"), now=0.0)
        c.receive(b"d", [commands.PING], user_id=KEYS["director"], now=TIMEOUT)
        if ending == "timeout":
            assert c.expire(TIMEOUT) == []  # not silent for longer than the timeout yet
            out = c.expire(TIMEOUT + 0.1)
        elif ending == "unreachable":
            out = c.unreachable(b"p")
        else:
            out = c.receive(b"p", [commands.BYE], user_id=KEYS["e1"], now=1.0)
        assert c.session_of(b"p") is None and c.session_of(b"d") is not None
        fired = [(s.peers, s.parts[1:]) for s in routed(out)]
        if ending == "bye":
            assert fired == [] and c.stats["wills"] == 0
        else:
            assert fired == [((b"d",), (T.presence("e1").encode(), b"gone"))]
            assert c.retained() == {T.presence("e1"): b"gone"}  # a retained will stays


def test_probe_asks_every_session() -> None:
    c = core()
    join(c, b"p", "e1")
    join(c, b"q", "e2")
    assert sorted(s.peers for s in sends(c.probe())) == [(b"p",), (b"q",)]
    assert all(s.parts == (commands.PONG,) for s in sends(c.probe()))


def test_a_full_backlog_drops_counted_per_subscriber_and_logged_sparingly() -> None:
    c = core(max_queued_frames=10)
    join(c, b"p", "e1")
    frame = (commands.MSG, b"t", b"x" * 10)
    warnings = [entry for _ in range(260) for entry in c.queue_full(b"p", frame)]
    # The first 10 wait in the backlog; the 250 after them are dropped.
    assert c.queued() == {"e1": (10, 10 * sum(map(len, frame)))}
    assert [w.fields["dropped"] for w in warnings] == [1, 101, 201]
    assert c.stats["dropped"] == 250 and c.stats["backlogged"] == 10
    assert c.queue_full(b"gone", frame) == [] and c.stats["dropped"] == 251


def test_a_backlog_keeps_order_and_drains_in_order() -> None:
    c = core()
    join(c, b"d", "director")
    join(c, b"p", "e1")
    join(c, b"q", "e2")
    for peer, node in ((b"p", "e1"), (b"q", "e2")):
        c.receive(peer, [commands.SUB, b"s", T.broadcast.encode()], user_id=KEYS[node], now=0.0)
    first = c.receive(b"d", pub(T.broadcast, b"1"), user_id=KEYS["director"], now=0.0)
    assert [s.peers for s in routed(first)] == [(b"p", b"q")]
    c.queue_full(b"p", routed(first)[0].parts)  # e1's pipe was full: frame 1 waits
    # While e1 lags, its frames queue behind frame 1; e2 gets them straight away.
    for payload in (b"2", b"3"):
        out = c.receive(b"d", pub(T.broadcast, payload), user_id=KEYS["director"], now=0.0)
        assert [s.peers for s in routed(out)] == [(b"q",)]
    assert c.backlogged == {b"p"}
    got = []
    while (parts := c.backlog_head(b"p")) is not None:
        got.append(parts[2])
        c.backlog_sent(b"p")
    assert got == [b"1", b"2", b"3"] and c.backlogged == frozenset()
    out = c.receive(b"d", pub(T.broadcast, b"4"), user_id=KEYS["director"], now=0.0)
    assert [s.peers for s in routed(out)] == [(b"p", b"q")]  # caught up: direct again
    # A session that goes away takes its backlog with it.
    c.queue_full(b"p", routed(out)[0].parts)
    c.unreachable(b"p")
    assert c.backlogged == frozenset() and c.backlog_head(b"p") is None


@settings(max_examples=150, deadline=None)
@given(
    events=st.lists(
        st.one_of(
            st.tuples(st.just("publish"), st.integers(1, 300)),
            st.tuples(st.just("drain"), st.integers(0, 6)),
        ),
        max_size=120,
    ),
    pipe=st.integers(0, 4),
    max_bytes=st.integers(1, 2000),
    max_frames=st.integers(1, 12),
)
def test_every_frame_arrives_in_order_or_is_counted_as_dropped(
    events, pipe, max_bytes, max_frames
) -> None:
    """A fake transport with a `pipe`-frame queue for a slow subscriber e1 (drained only on
    'drain' events) and an unbounded one for e2: e2 gets every frame; e1 gets a subsequence
    in publish order, and every frame it misses is one counted drop, made only while its
    backlog was at its bounds."""
    c = core(max_queued_bytes=max_bytes, max_queued_frames=max_frames)
    join(c, b"d", "director")
    for peer, node in ((b"p", "e1"), (b"q", "e2")):
        join(c, peer, node)
        c.receive(peer, [commands.SUB, b"s", T.broadcast.encode()], user_id=KEYS[node], now=0.0)
    slow_pipe: list[bytes] = []
    slow_got: list[bytes] = []
    fast_got: list[bytes] = []
    published: list[bytes] = []

    def transmit(peer: bytes, parts: tuple) -> bool:
        if peer == b"q":
            fast_got.append(parts[2])
            return True
        if len(slow_pipe) >= pipe:
            return False
        slow_pipe.append(parts[2])
        return True

    def drain_backlog() -> None:
        while (parts := c.backlog_head(b"p")) is not None and transmit(b"p", parts):
            c.backlog_sent(b"p")

    for i, (kind, n) in enumerate(events):
        if kind == "publish":
            payload = i.to_bytes(2, "big") + b"x" * (n - 1)
            published.append(payload)
            backlog_before = c.queued().get("e1", (0, 0))
            dropped_before = c.stats["dropped"]
            for send in routed(
                c.receive(b"d", pub(T.broadcast, payload), user_id=KEYS["director"], now=0.0)
            ):
                for peer in send.peers:
                    if not transmit(peer, send.parts):
                        c.queue_full(peer, send.parts)
            if c.stats["dropped"] > dropped_before:
                frames, size = backlog_before
                need = len(commands.MSG) + len(T.broadcast) + len(payload)
                assert frames and (frames >= max_frames or size + need > max_bytes), (
                    "dropped although the backlog had room"
                )
        else:
            slow_got += slow_pipe[:n]
            del slow_pipe[:n]
            drain_backlog()
    assert fast_got == published
    frames, _ = c.queued().get("e1", (0, 0))
    delivered = slow_got + slow_pipe
    assert len(delivered) + frames + c.stats["dropped"] == len(published)
    positions = [published.index(f) for f in delivered]
    assert positions == sorted(positions)  # in publish order, never duplicated


def test_refusals_are_all_answered_but_logged_sparingly() -> None:
    c = core()
    join(c, b"p", "e1")
    logged = answered = 0
    for _ in range(2000):
        out = c.receive(b"p", pub(T.broadcast, b"x"), user_id=KEYS["e1"], now=0.0)
        answered += len(replies(out, b"p"))
        logged += len(logs(out))
    assert answered == 2000
    assert logged == 20 + 2  # the first 20, then every 1000th
    assert c.stats["refused"] == 2000


def test_allow_list_is_validated() -> None:
    key = KEYS["e1"]
    assert parse_allow_list({key: ("e1", "envoy")}) == {key: NodeIdentity("e1", "envoy")}
    for bad in ({"short": ("e1", "envoy")}, {key: ("e/1", "envoy")}, {key: ("e1", "admin")}):
        with pytest.raises(ValueError):
            parse_allow_list(bad)


# -- random event sequences against a model -------------------------------------------------

# Small alphabets, so that a few steps reach the interesting interleavings (a frame routed,
# its subscriber gone, the same topic published again); "stranger" is not on the allow-list.
NODES = ("director", "e1", "e2", "stranger")
PEERS = (b"p0", b"p1", b"p2")
TOPICS = (T.director, T.broadcast, T.envoy("e1"), T.presence("e1"), T.presence("e2"))
FILTERS = (T.director, T.broadcast, T.envoy("e1"), T.presence_filter, "#")


@dataclass
class ModelSession:
    node: str
    role: str
    key: str
    last_seen: float
    filters: set[str] = field(default_factory=set)
    will: tuple[str, bytes] | None = None


class CoreMachine(RuleBasedStateMachine):
    """Every rule sends one event to the core and to a plain model; they must agree on who
    gets each routed frame, on the sessions, subscriptions and retained frames."""

    def __init__(self) -> None:
        super().__init__()
        self.core = core()
        self.now = 0.0
        self.sessions: dict[bytes, ModelSession] = {}
        self.retained: dict[str, bytes] = {}

    # -- the model's rules --------------------------------------------------------------

    def _targets(self, topic: str) -> set[bytes]:
        return {
            p for p, s in self.sessions.items() if any(topic_matches(f, topic) for f in s.filters)
        }

    def _drop(self, peer: bytes, *, will: bool) -> list[tuple[set[bytes], str, bytes]]:
        sess = self.sessions.pop(peer)
        if will and sess.will is not None:
            topic, payload = sess.will
            self.retained[topic] = payload
            return [(self._targets(topic), topic, payload)]
        return []

    def _bind(self, peer: bytes, node: str, expected: list) -> ModelSession | None:
        key = KEYS[node]
        if key not in ALLOW:
            return None
        sess = self.sessions.get(peer)
        if sess is not None and sess.key != key:
            expected += self._drop(peer, will=True)
            sess = None
        if sess is None:
            ident = ALLOW[key]
            sess = self.sessions[peer] = ModelSession(ident.node_id, ident.role, key, self.now)
        sess.last_seen = self.now
        return sess

    def _check(self, out: list, expected: list[tuple[set[bytes], str, bytes]]) -> None:
        got = [(set(s.peers), s.parts[1].decode(), s.parts[2]) for s in routed(out)]
        want = [(peers, topic, payload) for peers, topic, payload in expected if peers]
        assert got == want

    # -- rules ---------------------------------------------------------------------------

    @rule(peer=st.sampled_from(PEERS), node=st.sampled_from(NODES), with_will=st.booleans())
    def hello(self, peer: bytes, node: str, with_will: bool) -> None:
        expected: list = []
        sess = self._bind(peer, node, expected)
        will = (T.presence(node), b"gone-" + node.encode()) if with_will else None
        role = ALLOW[KEYS[node]].role if sess else "envoy"
        out = self.core.receive(peer, hello(node, role, will), user_id=KEYS[node], now=self.now)
        if sess is not None:
            allowed = will is None or acl_allows(
                federation=FED, node_id=sess.node, role=sess.role, action="publish", topic=will[0]
            )
            if allowed:
                sess.will = will
        self._check(out, expected)

    @rule(
        peer=st.sampled_from(PEERS),
        node=st.sampled_from(NODES),
        topic=st.sampled_from(TOPICS),
        retain=st.booleans(),
        payload=st.sampled_from([b"", b"a", b"bb"]),
    )
    def publish(self, peer: bytes, node: str, topic: str, retain: bool, payload: bytes) -> None:
        expected: list = []
        sess = self._bind(peer, node, expected)
        out = self.core.receive(
            peer, pub(topic, payload, retain=retain), user_id=KEYS[node], now=self.now
        )
        if sess is not None and acl_allows(
            federation=FED, node_id=sess.node, role=sess.role, action="publish", topic=topic
        ):
            if retain:
                if payload:
                    self.retained[topic] = payload
                else:
                    self.retained.pop(topic, None)
            expected.append((self._targets(topic), topic, payload))
        self._check(out, expected)

    @rule(peer=st.sampled_from(PEERS), node=st.sampled_from(NODES), flt=st.sampled_from(FILTERS))
    def subscribe(self, peer: bytes, node: str, flt: str) -> None:
        expected: list = []
        sess = self._bind(peer, node, expected)
        out = self.core.receive(
            peer, [commands.SUB, b"r", flt.encode()], user_id=KEYS[node], now=self.now
        )
        if sess is not None and acl_allows(
            federation=FED, node_id=sess.node, role=sess.role, action="subscribe", topic=flt
        ):
            sess.filters.add(flt)
            replayed = {r[1].decode(): r[2] for r in replies(out, peer) if r[0] == commands.MSG}
            assert replayed == {t: p for t, p in self.retained.items() if topic_matches(flt, t)}
        self._check(out, expected)

    @rule(peer=st.sampled_from(PEERS), node=st.sampled_from(NODES), flt=st.sampled_from(FILTERS))
    def unsubscribe(self, peer: bytes, node: str, flt: str) -> None:
        expected: list = []
        sess = self._bind(peer, node, expected)
        out = self.core.receive(
            peer, [commands.UNSUB, b"r", flt.encode()], user_id=KEYS[node], now=self.now
        )
        if sess is not None:
            sess.filters.discard(flt)
        self._check(out, expected)

    @precondition(lambda self: self.sessions)
    @rule(data=st.data())
    def bye(self, data: st.DataObject) -> None:
        peer = data.draw(st.sampled_from(sorted(self.sessions)))
        key = self.sessions[peer].key
        self._drop(peer, will=False)
        self._check(self.core.receive(peer, [commands.BYE], user_id=key, now=self.now), [])

    @rule(peer=st.sampled_from(PEERS))
    def vanish(self, peer: bytes) -> None:
        expected = self._drop(peer, will=True) if peer in self.sessions else []
        self._check(self.core.unreachable(peer), expected)

    @rule(seconds=st.sampled_from([0.5, 2.0, TIMEOUT + 0.5]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        expected = []
        for peer in list(self.sessions):
            if self.now - self.sessions[peer].last_seen > TIMEOUT:
                expected += self._drop(peer, will=True)
        out = self.core.expire(self.now)
        # Several wills may fire in one sweep: compare as a multiset of (peers, topic, payload).
        got = sorted((sorted(s.peers), s.parts[1].decode(), s.parts[2]) for s in routed(out))
        want = sorted((sorted(p), t, pl) for p, t, pl in expected if p)
        assert got == want

    @invariant()
    def same_state(self) -> None:
        assert set(self.core.peers) == set(self.sessions)
        for peer, sess in self.sessions.items():
            assert self.core.session_of(peer) == (sess.node, sess.role)
            assert self.core.subscriptions(peer) == sess.filters
        assert self.core.retained() == self.retained


TestCoreMachine = CoreMachine.TestCase
TestCoreMachine.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)
