"""The page's data: allow-listed from the director's status and records, never more."""

from __future__ import annotations

import json
import math
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from node.roundlog import encode_line
from node.ui.feed import MemoryFeed, StateDirFeed, public_view
from tests.ui.uiharness import director_status, round_record

SECRET = "SECRET-7f3a9c"


def _planted() -> tuple[dict, list[dict]]:
    """A status and records carrying things the page must never show."""
    status = director_status(2, "masked_input", online={"envoy-1": True, "envoy-2": False})
    status.update(signing_key=SECRET, state_dir=f"/var/lib/{SECRET}", credentials={"k": SECRET})
    status["envoys"]["envoy-1"]["secret_share"] = SECRET
    record = round_record(1, dropped=["envoy-3"])
    record["metrics"]["per_envoy"] = {"envoy-1": {"auc": 0.9, "note": SECRET}}
    record["metrics"]["val"]["debug"] = SECRET
    record["audit_path"] = SECRET
    return status, [record]


def test_nothing_outside_the_allow_list_reaches_the_page() -> None:
    view = public_view(*_planted(), now=1.0)
    text = json.dumps(view)
    assert SECRET not in text
    assert "per_envoy" not in text and "signing_key" not in text
    assert view["envoys"] == [
        {
            "name": "envoy-1",
            "online": True,
            "last_seen": view["envoys"][0]["last_seen"],
            "stage": "masked_input",
            "refused": "",
        },
        {
            "name": "envoy-2",
            "online": False,
            "last_seen": view["envoys"][1]["last_seen"],
            "stage": "masked_input",
            "refused": "",
        },
    ]
    assert view["rounds"][0]["dropped"] == ["envoy-3"]


def test_roc_points_travel_for_the_latest_and_the_best_round_only() -> None:
    records = [round_record(r) for r in (1, 2, 3)]
    for r in records:
        r["best_round"] = 2
    view = public_view(director_status(4, "training", online={}), records, now=1.0)
    assert view["roc_latest"]["round"] == 3 and view["roc_best"]["round"] == 2
    assert len(view["roc_latest"]["fpr"]) == 101
    assert all("roc_fpr" not in json.dumps(r) for r in view["rounds"])
    assert view["best_round"] == 2


def test_undefined_numbers_become_null() -> None:
    record = round_record(1)
    record["metrics"]["val"]["auc"] = float("nan")
    record["seconds"] = float("inf")
    view = public_view({}, [record], now=1.0)
    assert view["rounds"][0]["val"]["auc"] is None and view["rounds"][0]["seconds"] is None
    json.dumps(view, allow_nan=False)  # strict JSON


JSONISH = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=300),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=30,
)


@given(st.dictionaries(st.text(max_size=15), JSONISH, max_size=8), st.lists(JSONISH, max_size=4))
def test_any_status_or_records_give_a_bounded_strict_json_view(status, records) -> None:
    view = public_view(status, records, now=1.0)
    text = json.dumps(view, allow_nan=False)
    for value in _leaves(view):
        assert not (isinstance(value, str) and len(value) > 120)
        assert not (isinstance(value, float) and not math.isfinite(value))
    assert isinstance(json.loads(text)["envoys"], list)


def _leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def test_state_dir_feed_reads_what_the_director_writes(tmp_path: Path) -> None:
    feed = StateDirFeed(tmp_path)
    status, records = feed.snapshot()
    assert status["stage"] == "no director status yet" and records == []
    (tmp_path / "status.json").write_text(json.dumps(director_status(1, "training", online={})))
    with open(tmp_path / "rounds.jsonl", "ab") as fh:
        fh.write(encode_line(round_record(1)))
        fh.write(b'{"record": {"round": 2, "trunc')  # a line being appended right now
    status, records = feed.snapshot()
    assert status["federation"] == "pneumonia" and [r["round"] for r in records] == [1]
    with open(tmp_path / "rounds.jsonl", "wb") as fh:
        fh.write(b"".join(encode_line(round_record(r)) for r in (1, 2)))
    assert [r["round"] for r in feed.snapshot()[1]] == [1, 2]


def test_memory_feed_copies_what_is_published() -> None:
    feed = MemoryFeed()
    status = director_status(1, "training", online={"envoy-1": True})
    feed.publish_status(status)
    record = round_record(1)
    feed.publish_record(record)
    status["round"] = 99
    record["round"] = 99
    got_status, got_records = feed.snapshot()
    assert got_status["round"] == 1 and got_records[0]["round"] == 1
    feed.replace_records([round_record(5)])
    assert [r["round"] for r in feed.snapshot()[1]] == [5]


def test_a_three_class_round_sends_each_classs_curve_and_a_refused_envoy_says_so() -> None:
    import numpy as np

    from node.training.histograms import histogram_vector, metrics_from_vector

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 90)
    logits = rng.normal(size=(90, 3))
    logits[np.arange(90), labels] += 2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    record = round_record(1)
    record["metrics"]["val"] = metrics_from_vector(
        histogram_vector(probs, labels, 20), 3, 20, ["a", "b", "c"]
    )
    status = director_status(2, "training", online={"envoy-1": True, "envoy-9": False})
    status["envoys"]["envoy-9"]["refused"] = "model mismatch"
    view = public_view(status, [record], now=1.0)
    roc = view["roc_latest"]
    assert [c["name"] for c in roc["classes"]] == ["a", "b", "c"]
    assert all(len(c["fpr"]) == len(c["tpr"]) == 21 for c in roc["classes"])
    assert roc["auc"] == record["metrics"]["val"]["auc"]  # the macro AUC
    assert [c["auc"] for c in roc["classes"]] == [
        c["auc"] for c in record["metrics"]["val"]["per_class"]
    ]
    assert view["envoys"][1]["refused"] == "model mismatch"
    assert view["envoys"][0]["refused"] == ""
