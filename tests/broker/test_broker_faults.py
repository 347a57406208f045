"""Fault plans: parsing with precise errors, the Python builder, and FaultyBus behaviours."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.client.bus import Bus, Will
from broker.faults import (
    FaultPlan,
    FaultPlanError,
    FaultyBus,
    corrupt_bytes,
    crash_if_planned,
)
from broker.topics import Topics, topic_matches
from protocol.stages import CRASH_STAGES
from tests.broker.broker_testkit import FEDERATION

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "configs" / "faults").glob("*.toml"))
T = Topics(FEDERATION)


class MemoryBus(Bus):
    """Records what reaches the transport; delivers to local subscribers."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bool]] = []
        self._subs: list[tuple[str, asyncio.Queue[bytes]]] = []
        self.closed = False

    async def publish(self, topic: str, frame: bytes, *, retain: bool = False) -> None:
        self.sent.append((topic, frame, retain))
        for f, q in self._subs:
            if topic_matches(f, topic):
                q.put_nowait(frame)

    def subscribe(self, topic_filter: str) -> AsyncIterator[bytes]:
        q: asyncio.Queue[bytes] = asyncio.Queue()
        self._subs.append((topic_filter, q))

        async def gen() -> AsyncIterator[bytes]:
            while True:
                yield await q.get()

        return gen()

    async def close(self) -> None:
        self.closed = True


def test_example_plans_load_and_round_trip() -> None:
    assert len(EXAMPLES) >= 4
    for path in EXAMPLES:
        plan = FaultPlan.load(path)
        assert FaultPlan.loads(plan.to_toml()) == plan, path


def test_python_api_builds_the_toml_plan() -> None:
    built = (
        FaultPlan(seed=7)
        .crash("envoy-2", round=1, stage="share_keys")
        .link("*", drop=0.05, duplicate=0.02, corrupt=0.01, delay_ms=(0, 200), reorder=0.05)
        .partition(["envoy-3"], from_s=20, to_s=40)
        .broker_restart(at_s=30, down_s=1.0)
    )
    assert built == FaultPlan.load(ROOT / "configs" / "faults" / "chaos.toml")


def test_saved_plan_is_read_back(tmp_path: Path) -> None:
    plan = FaultPlan(seed=3).link("envoy-1", drop=0.5).crash("envoy-1", round=0, stage="unmask")
    plan.save(tmp_path / "p.toml")
    assert FaultPlan.load(tmp_path / "p.toml") == plan


BAD = [
    ("seed = -1", "seed"),
    ('seed = "x"', "seed"),
    ("colour = 1", "colour"),
    ('[[crash]]\nenvoy = "e"\nround = 1\nstage = "lunch"', "crash[0].stage"),
    ('[[crash]]\nenvoy = "e"\nround = 1\nstage = "evaluate"', "crash[0].stage"),
    (
        '[[crash]]\nenvoy = "e"\nstage = "unmask"',
        "missing required field `round` - at `$.crash[0]`",
    ),
    (
        '[[crash]]\nenvoi = "e"\nround = 1\nstage = "unmask"',
        "unknown field `envoi` - at `$.crash[0]`",
    ),
    ('[[crash]]\nenvoy = "a/b"\nround = 1\nstage = "unmask"', "crash[0].envoy"),
    ('[[link]]\nnode = "*"\ndrop = 1.5', "link[0].drop"),
    ('[[link]]\nnode = "*"\nreorder = "often"', "link[0].reorder"),
    ('[[link]]\nnode = "*"\ndelay_ms = [200, 100]', "link[0].delay_ms"),
    ('[[link]]\nnode = "*"\ndelay_ms = [1, 2, 3]', "link[0].delay_ms"),
    ('[[link]]\nnode = "*"\n[[link]]\nnode = "*"', "link[1].node"),
    ("[[partition]]\nnodes = []\nfrom_s = 1\nto_s = 2", "partition[0].nodes"),
    ('[[partition]]\nnodes = ["e"]\nfrom_s = 5\nto_s = 2', "partition[0].to_s"),
    ("[[broker_restart]]\ndown_s = 1", "missing required field `at_s` - at `$.broker_restart[0]`"),
    ("link = 3", "link"),
    ("seed = ", "not valid TOML"),
]


@pytest.mark.parametrize(("text", "field"), BAD)
def test_bad_plans_name_the_file_and_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "plan.toml"
    path.write_text(text + "\n")
    with pytest.raises(FaultPlanError) as info:
        FaultPlan.load(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert field in message, message


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FaultPlanError, match="not found"):
        FaultPlan.load(tmp_path / "absent.toml")


def test_builder_validates_like_the_file() -> None:
    with pytest.raises(FaultPlanError, match=r"link\[0\]\.drop"):
        FaultPlan().link(drop=2.0)
    with pytest.raises(FaultPlanError, match=r"crash\[0\]\.stage"):
        FaultPlan().crash("e", round=0, stage="nope")


def test_crash_points() -> None:
    plan = (
        FaultPlan()
        .crash("envoy-2", round=1, stage="share_keys")
        .crash("*", round=5, stage="unmask")
    )
    assert plan.crash_point("envoy-2", 1, "share_keys")
    assert not plan.crash_point("envoy-2", 2, "share_keys")
    assert not plan.crash_point("envoy-1", 1, "share_keys")
    assert not plan.crash_point("envoy-2", 1, "unmask")
    assert all(plan.crash_point(n, 5, "unmask") for n in ("envoy-1", "envoy-9"))
    with pytest.raises(ValueError, match="stage"):
        plan.crash_point("envoy-2", 1, "lunch")
    exits: list[int] = []
    crash_if_planned(plan, "envoy-2", 1, "share_keys", exit=exits.append)
    crash_if_planned(plan, "envoy-2", 1, "training", exit=exits.append)
    crash_if_planned(None, "envoy-2", 1, "share_keys", exit=exits.append)
    assert exits == [137]
    assert set(CRASH_STAGES) >= {"training", "unmask"}


def test_specific_link_replaces_the_wildcard() -> None:
    plan = FaultPlan().link("*", drop=0.1).link("envoy-4", drop=0.9)
    assert plan.link_for("envoy-4").drop == 0.9  # type: ignore[union-attr]
    assert plan.link_for("envoy-1").drop == 0.1  # type: ignore[union-attr]
    assert FaultPlan().link("envoy-4", drop=0.9).link_for("envoy-1") is None


async def send_all(bus: FaultyBus, n: int) -> None:
    for i in range(n):
        await bus.publish(T.director, b"frame-%04d" % i)


async def test_drop_everything_and_nothing() -> None:
    inner = MemoryBus()
    await send_all(FaultyBus(inner, FaultPlan().link(drop=1.0), "envoy-1"), 50)
    assert inner.sent == []
    inner = MemoryBus()
    await send_all(FaultyBus(inner, FaultPlan().link("envoy-9", drop=1.0), "envoy-1"), 50)
    assert [f for _, f, _ in inner.sent] == [b"frame-%04d" % i for i in range(50)]


async def test_drop_rate_follows_the_probability() -> None:
    inner = MemoryBus()
    bus = FaultyBus(inner, FaultPlan(seed=5).link(drop=0.3), "envoy-1")
    await send_all(bus, 2000)
    # Binomial(2000, 0.7): mean 1400, sd ~20.5; 6 sd either side.
    assert 1277 <= len(inner.sent) <= 1523
    assert bus.counts["dropped"] + len(inner.sent) == 2000


async def test_duplicates_and_corruption() -> None:
    inner = MemoryBus()
    bus = FaultyBus(inner, FaultPlan().link(duplicate=1.0), "envoy-1")
    await send_all(bus, 10)
    assert [f for _, f, _ in inner.sent] == [b"frame-%04d" % (i // 2) for i in range(20)]
    inner = MemoryBus()
    bus = FaultyBus(inner, FaultPlan().link(corrupt=1.0), "envoy-1")
    await send_all(bus, 100)
    for i, (_, frame, _) in enumerate(inner.sent):
        original = b"frame-%04d" % i
        assert len(frame) == len(original) and frame != original


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(0, 2**32))
def test_corruption_always_changes_the_frame(frame: bytes, seed: int) -> None:
    import random

    out = corrupt_bytes(frame, random.Random(seed))
    assert len(out) == len(frame) and out != frame
    assert sum(a != b for a, b in zip(out, frame, strict=True)) <= 8


async def test_reorder_swaps_neighbours() -> None:
    inner = MemoryBus()
    bus = FaultyBus(inner, FaultPlan().link(reorder=1.0), "envoy-1")
    await send_all(bus, 6)
    # Every held frame goes out right after the next one: 1 0 3 2 5 4.
    assert [f for _, f, _ in inner.sent] == [b"frame-%04d" % i for i in (1, 0, 3, 2, 5, 4)]


async def test_reorder_releases_a_held_frame_without_followers() -> None:
    inner = MemoryBus()
    bus = FaultyBus(inner, FaultPlan().link(reorder=1.0), "envoy-1")
    await send_all(bus, 1)
    assert inner.sent == []
    while not inner.sent:
        await asyncio.sleep(0.01)
    assert inner.sent == [(T.director, b"frame-0000", False)]


async def test_delay_delivers_everything_later() -> None:
    inner = MemoryBus()
    bus = FaultyBus(inner, FaultPlan().link(delay_ms=(5, 20)), "envoy-1")
    await send_all(bus, 20)
    assert len(inner.sent) < 20  # nothing with a positive delay can have gone out yet
    while len(inner.sent) < 20:
        await asyncio.sleep(0.01)
    assert sorted(f for _, f, _ in inner.sent) == [b"frame-%04d" % i for i in range(20)]
    assert bus.counts["delayed"] == 20
    await bus.close()
    assert inner.closed


@pytest.mark.parametrize("link", [{"delay_ms": (20, 50)}, {"reorder": 1.0}])
async def test_a_clean_close_still_delivers_what_was_published_before_it(link) -> None:
    """A slow link delays frames, it does not eat them: an envoy's last presence, published
    just before it leaves, reaches the broker (a lost one left the director waiting)."""
    inner = MemoryBus()
    bus = FaultyBus(inner, FaultPlan().link(**link), "envoy-1")
    await send_all(bus, 3)
    await bus.close()
    assert sorted(f for _, f, _ in inner.sent) == [b"frame-%04d" % i for i in range(3)]
    assert inner.closed


link_params = st.fixed_dictionaries(
    {
        "drop": st.floats(0, 1),
        "duplicate": st.floats(0, 1),
        "corrupt": st.floats(0, 1),
        "reorder": st.floats(0, 1),
    }
)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**40), link_params, st.integers(1, 40))
def test_same_seed_same_faults(seed: int, params: dict[str, float], n: int) -> None:
    # The replay guarantee: a plan and a traffic sequence fully decide what reaches the wire.
    plan = FaultPlan(seed=seed).link(**params)

    async def run(node: str) -> tuple[list[tuple[str, bytes, bool]], dict[str, int]]:
        inner = MemoryBus()
        bus = FaultyBus(inner, plan, node)
        await send_all(bus, n)
        await bus._release_held()  # flush a frame still held for reordering
        return inner.sent, bus.counts

    first, second = asyncio.run(run("envoy-1")), asyncio.run(run("envoy-1"))
    assert first == second
    sent, counts = first
    assert counts["dropped"] + counts["sent"] - counts["duplicated"] == n
    assert len(sent) == counts["sent"]


async def test_partition_window_cuts_both_directions() -> None:
    now = [1000.0]
    inner = MemoryBus()
    plan = FaultPlan().partition(["envoy-3"], from_s=10, to_s=20)
    bus = FaultyBus(inner, plan, "envoy-3", started_at=1000.0, clock=lambda: now[0])
    other = FaultyBus(inner, plan, "envoy-1", started_at=1000.0, clock=lambda: now[0])
    sub = bus.subscribe(T.broadcast)
    await bus.publish(T.director, b"t0")
    now[0] = 1015.0
    await bus.publish(T.director, b"t15")
    await other.publish(T.director, b"other-t15")
    await inner.publish(T.broadcast, b"bc-t15")  # arrives while cut off: lost
    await asyncio.sleep(0)  # let the subscription pump see it now, at t=15
    now[0] = 1020.0
    await bus.publish(T.director, b"t20")
    await inner.publish(T.broadcast, b"bc-t20")
    assert [f for t, f, _ in inner.sent if t == T.director] == [b"t0", b"other-t15", b"t20"]
    assert await anext(sub) == b"bc-t20"
    assert bus.counts["partitioned_out"] == 1 and bus.counts["partitioned_in"] == 1


async def test_faulty_bus_over_a_real_broker(client, topics: Topics) -> None:
    director = await client("director")
    envoy = await client("envoy-a", will=Will(topics.presence("envoy-a"), b"gone"))
    inbox = director.subscribe(topics.director)
    await inbox.ready()
    faulty = FaultyBus(envoy, FaultPlan(seed=1).link(duplicate=1.0), "envoy-a")
    await faulty.publish(topics.director, b"twice")
    assert [await anext(inbox), await anext(inbox)] == [b"twice", b"twice"]
    mailbox = faulty.subscribe(topics.envoy("envoy-a"))
    await mailbox.ready()
    await director.publish(topics.envoy("envoy-a"), b"hello")
    assert await anext(mailbox) == b"hello"
    assert faulty.node_id == "envoy-a" and faulty.refusals == []  # transport extras pass through
