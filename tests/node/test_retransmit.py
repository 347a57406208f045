"""Lost stage messages cost a retry, not the round (node.retransmit; issue #16 point 1).

Unit properties of the schedule and of the envoy's answer log, then whole rounds over the
in-memory bus (production director and envoy code) whose bus loses chosen frames: the first
copy of every stage message to one envoy, or from it, or a seeded share of all frames. Every
round must still complete with every envoy in the sum and none dropped, the aggregate exactly
the FedAvg of all updates, the evaluation by every envoy.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.checkpoint import load_checkpoint
from node.retransmit import Answers, RetrySchedule, StageRequests, message_key, resend_plan
from protocol.codec import Codec
from protocol.events import BROADCAST, Outgoing
from protocol.messages import RoundEnd
from tests.datafiles import REPO
from tests.node.nodeharness import expected_weights, make_fed

# -- the schedule ------------------------------------------------------------------------------

times = st.floats(min_value=0, max_value=1e4, allow_nan=False)
spans = st.floats(min_value=1e-3, max_value=100, allow_nan=False)


@given(
    first=spans,
    extra=spans,
    opened=times,
    events=st.lists(st.tuples(st.booleans(), spans), max_size=12),
)
def test_re_sends_follow_silence_doubling_up_to_max_s_and_reset_by_answers(
    first, extra, opened, events
):
    """(True, gap): an answer `gap` after the last event; (False, _): a re-send when due."""
    max_s = first + extra
    s = RetrySchedule(first, max_s, opened)
    now = opened
    silent_waits: list[float] = []
    for is_answer, gap in events:
        if is_answer:
            now += gap
            s = s.answered(now)
            silent_waits = []
            assert s.due == pytest.approx(now + first)  # every answer restarts the wait
        else:
            wait = s.due - s.quiet_since
            assert first * (1 - 1e-9) <= wait <= max_s * (1 + 1e-9)
            if silent_waits:  # back-off while the silence lasts: waits double up to max_s
                assert wait == pytest.approx(min(max_s, 2 * silent_waits[-1]))
            silent_waits.append(wait)
            now = s.due
            s = s.resent(now)
        assert s.due > now  # never due in the past


def test_a_stage_is_re_sent_after_first_s_of_silence():
    s = RetrySchedule(2.0, 30.0, opened_at=100.0)
    assert s.due == 102.0
    s = s.answered(105.0)  # answers keep coming: nothing is due while they do
    assert s.due == 107.0
    s = s.resent(107.0)
    assert s.due == 111.0  # silence: 4 s, 8 s, 16 s, then at most 30 s
    s = s.resent(111.0).resent(119.0).resent(135.0)
    assert s.due == 165.0
    assert s.answered(140.0).due == 142.0


@pytest.mark.parametrize(("first", "max_s"), [(0.0, 1.0), (2.0, 1.0), (-1.0, 5.0)])
def test_a_schedule_needs_0_lt_first_le_max(first, max_s):
    with pytest.raises(ValueError, match="first_s"):
        RetrySchedule(first, max_s, 0.0)


# -- the envoy's answers -----------------------------------------------------------------------


def _body(i: int) -> RoundEnd:
    return RoundEnd(status="completed", reason=f"m{i}")


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5)), max_size=30))
def test_answers_replay_exactly_what_was_sent_after_each_request(script):
    """(True, i): director message i arrives (opened unless seen); (False, i): the envoy
    sends body i. A replay is everything sent after that message until the next one."""
    answers = Answers()
    model: dict[bytes, list] = {}
    latest = None
    for is_request, i in script:
        if is_request:
            key = message_key(1, _body(i))
            if key not in model:
                answers.opened(key)
                model[key] = []
                latest = key
        else:
            answers.sent(_body(i))
            if latest is not None:
                model[latest].append(_body(i))
    for i in range(6):
        key = message_key(1, _body(i))
        assert answers.replay(key) == model.get(key)


def test_the_same_body_in_another_round_is_another_message():
    assert message_key(1, _body(0)) != message_key(2, _body(0))
    assert message_key(1, _body(0)) == message_key(1, _body(0))
    assert message_key(1, _body(0)) != message_key(1, _body(1))


def test_stage_requests_re_send_broadcasts_and_own_messages_to_each_participant():
    a, b, c = _body(1), _body(2), _body(3)
    requests = StageRequests([Outgoing(BROADCAST, a), Outgoing("envoy-1", b)])
    requests.add([Outgoing("envoy-2", c)])
    assert requests.for_participant("envoy-1") == [a, b]
    assert requests.for_participant("envoy-2") == [a, c]
    assert resend_plan(requests, ["envoy-2", "envoy-3"]) == [
        Outgoing("envoy-2", a),
        Outgoing("envoy-2", c),
        Outgoing("envoy-3", a),
    ]


# -- whole rounds over a bus that loses frames -------------------------------------------------

CODEC = Codec(1 << 20)
TO_ENVOY = {
    "RoundStart",
    "EvaluateRequest",
    "SecAggKeyRoster",
    "SecAggForwardedShares",
    "SecAggConsistencyRequest",
    "SecAggUnmaskRequest",
}
FROM_ENVOY = {
    "SecAggAdvertiseKeys",
    "SecAggShareKeys",
    "SecAggMaskedInput",
    "SecAggConsistencySignature",
    "SecAggUnmaskResponse",
}
PLAIN_FROM_ENVOY = {"PlainUpdate", "EvaluateResult"}


class LoseFirstCopies:
    """Loses the first copy of each (type, session) of `types` between the director and
    `envoy` in one direction: what it lost is in `lost`."""

    def __init__(self, envoy: str, types: set[str], *, to_envoy: bool) -> None:
        self.envoy, self.types, self.to_envoy = envoy, types, to_envoy
        self.lost: Counter[str] = Counter()
        self._seen: set[tuple[str, int, object]] = set()

    def __call__(self, sender: str, topic: str, frame: bytes, receiver: str) -> bool:
        if (receiver, sender) != (
            (self.envoy, "director") if self.to_envoy else ("director", self.envoy)
        ):
            return False
        env = CODEC.decode(frame)
        kind = type(env.body).__name__
        if kind not in self.types:
            return False
        key = (kind, env.round, getattr(env.body, "round", None))
        if key in self._seen:
            return False
        self._seen.add(key)
        self.lost[kind] += 1
        return True


class LoseShare:
    """Loses a seeded share of every copy of every message but presence (retained, and
    losing it is heartbeat loss, tested elsewhere): the Shutdown at the end too."""

    def __init__(self, p: float, seed: int) -> None:
        self.p, self.rng, self.lost = p, random.Random(seed), 0

    def __call__(self, sender: str, topic: str, frame: bytes, receiver: str) -> bool:
        if "/presence/" in topic:
            return False
        if self.rng.random() < self.p:
            self.lost += 1
            return True
        return False


# The SecAgg stages and the evaluation: the deadlines the loss tests set.
STAGES = ("advertise_keys", "share_keys", "masked_input", "consistency", "unmask", "evaluate")


async def _federation_under(
    tmp_path,
    lose,
    *,
    envoys: int = 4,
    secure: bool = True,
    rounds: int = 2,
    deadline_s: float = 8.0,
    **director: object,
):
    fed = make_fed(
        tmp_path,
        envoys,
        secure=secure,
        rounds=rounds,
        retry={"first_s": 0.2, "max_s": 1.0},
        # A stage that closed without an envoy would drop it: the deadlines are long enough
        # for several re-sends and short enough that a missing retry fails the test quickly.
        deadlines={s: deadline_s for s in STAGES},
        **director,
    )
    fed.broker.lose = lose
    for name in fed.envoy_cfgs:
        fed.start_envoy(name)
    rc = await asyncio.wait_for(fed.director().run(), 180)
    # The director returns once every envoy left after its Shutdown (told again if lost).
    # Their last steps after going offline; the bound only guards against a hang (an envoy
    # that never got its Shutdown would never end).
    await asyncio.wait_for(asyncio.wait(fed.tasks.values()), 120)
    await fed.stop()
    return fed, rc


def _assert_every_envoy_in_every_round(fed, rc, rounds: int) -> None:
    assert rc == 0
    records = fed.records()
    everyone = sorted(fed.envoy_cfgs)
    assert [r["round"] for r in records] == list(range(1, rounds + 1))
    for rec in records:
        assert rec["attempt"] == 0, rec["round"]  # no attempt was lost either
        assert rec["survivors"] == everyone and rec["dropped"] == [] and rec["left"] == []
        assert rec["fates"] == {n: {"fate": "survivor"} for n in everyone}
        assert rec["metrics"]["evaluated_by"] == everyone
    want = expected_weights(fed, [everyone] * rounds)
    for k, v in load_checkpoint(fed.director_cfg.state_dir).weights_numpy().items():
        np.testing.assert_allclose(v, want[k], rtol=0, atol=4e-6)


@pytest.mark.parametrize("to_envoy", [True, False], ids=["requests-lost", "answers-lost"])
async def test_a_lost_stage_message_costs_a_retry_not_the_envoy(tmp_path, to_envoy):
    lose = LoseFirstCopies("envoy-2", TO_ENVOY if to_envoy else FROM_ENVOY, to_envoy=to_envoy)
    fed, rc = await _federation_under(tmp_path, lose)
    _assert_every_envoy_in_every_round(fed, rc, 2)
    # Every kind of stage message was lost once per session (training and evaluation)...
    kinds = TO_ENVOY if to_envoy else FROM_ENVOY
    assert set(lose.lost) == kinds, lose.lost
    # ...and answered again from what the envoy had sent, never computed anew: each
    # envoy trained each round once.
    assert all(t.calls == 2 for t in fed.trainers.values())
    if not to_envoy:
        assert fed.envoys["envoy-2"].answered_again >= len(FROM_ENVOY)


async def test_plain_rounds_re_request_lost_updates_and_evaluations(tmp_path):
    lose = LoseFirstCopies("envoy-3", PLAIN_FROM_ENVOY, to_envoy=False)
    fed, rc = await _federation_under(tmp_path, lose, secure=False)
    _assert_every_envoy_in_every_round(fed, rc, 2)
    assert set(lose.lost) == PLAIN_FROM_ENVOY


@pytest.mark.parametrize("seed", [1, 2])
async def test_rounds_complete_with_every_envoy_when_a_tenth_of_all_frames_is_lost(tmp_path, seed):
    lose = LoseShare(0.1, seed)
    fed, rc = await _federation_under(tmp_path, lose)
    _assert_every_envoy_in_every_round(fed, rc, 2)
    assert lose.lost >= 5  # the run did lose frames


def test_a_retry_config_out_of_order_names_the_field_and_the_file(tmp_path):
    from node.config import load_director_config
    from protocol.configfile import ConfigError

    text = (REPO / "configs" / "director.toml").read_text()
    bad = tmp_path / "director.toml"
    bad.write_text(text.replace("first_s = 2.0", "first_s = 60.0"))
    with pytest.raises(ConfigError) as exc:
        load_director_config(bad)
    assert "first_s" in str(exc.value) and str(bad) in str(exc.value)
    bad.write_text(text.replace("max_s = 30.0", "max_s = -1.0"))
    with pytest.raises(ConfigError, match=r"retry\.max_s"):
        load_director_config(bad)


class CutOffDuringConsistency:
    """Loses every frame from and to `names` for `seconds`, from the moment the director
    first asks for consistency signatures (a partition that lands where a failed attempt
    would fail the round: the signers sit out its later attempts)."""

    def __init__(self, names: set[str], seconds: float) -> None:
        self.names, self.seconds = names, seconds
        self.started: float | None = None
        self.lost = 0

    def __call__(self, sender: str, topic: str, frame: bytes, receiver: str) -> bool:
        import time

        if self.started is None:
            if sender == "director" and type(CODEC.decode(frame).body).__name__ == (
                "SecAggConsistencyRequest"
            ):
                self.started = time.monotonic()
            else:
                return False
        if time.monotonic() - self.started > self.seconds:
            return False
        if sender in self.names or receiver in self.names:
            self.lost += 1
            return True
        return False


async def test_envoys_cut_off_during_consistency_are_waited_for_and_the_round_completes(tmp_path):
    """Three of five envoys fall silent (heartbeats lost too) right as consistency opens:
    closing the stage without them would leave fewer signatures than t and fail the round
    for good. They are only silent, not gone, so the director waits for them; when they are
    back it sends them the request again and the round completes with everyone."""
    from structlog.testing import capture_logs

    cut = CutOffDuringConsistency({"envoy-3", "envoy-4", "envoy-5"}, seconds=2.5)
    with capture_logs() as logs:
        fed, rc = await _federation_under(
            tmp_path, cut, envoys=5, rounds=1, deadline_s=20.0, heartbeat_timeout_s=1.0
        )
    assert cut.started is not None and cut.lost > 0
    events = [e["event"] for e in logs]
    assert "stage_waits_for_return" in events and "round_aborted" not in events
    _assert_every_envoy_in_every_round(fed, rc, 1)
