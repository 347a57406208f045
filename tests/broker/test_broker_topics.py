"""Topic scheme, MQTT filter matching (against an independent regex model) and the ACL matrix."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.topics import (
    ACL_RULES,
    Topics,
    acl_allows,
    acl_patterns,
    filter_covered,
    topic_matches,
    validate_filter,
)

F = "fed1"
T = Topics(F)

levels = st.sampled_from(["a", "b", "", "ab", "$x"])
topic_st = st.lists(levels, min_size=1, max_size=5).map("/".join)


@st.composite
def filter_st(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.sampled_from(["a", "b", "", "+", "ab", "$x"]), min_size=0, max_size=5))
    if draw(st.booleans()) or not parts:
        parts.append("#")
    return "/".join(parts)


def regex_model(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 section 4.7 written as a regex, independently of broker.topics."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    parts = topic_filter.split("/")
    pattern = ""
    for i, p in enumerate(parts):
        sep = "/" if i else ""
        if p == "#":
            # "#" alone matches everything; "x/#" matches "x" and anything below it.
            pattern += ".*" if i == 0 else "(?:/.*)?"
            break
        pattern += sep + ("[^/]*" if p == "+" else re.escape(p))
    return re.fullmatch(pattern, topic, flags=re.DOTALL) is not None


@settings(max_examples=400, deadline=None)
@given(filter_st(), topic_st)
def test_topic_matches_agrees_with_regex_model(topic_filter: str, topic: str) -> None:
    assert topic_matches(topic_filter, topic) == regex_model(topic_filter, topic)


@settings(max_examples=200, deadline=None)
@given(topic_st, st.data())
def test_filters_derived_from_a_topic_match_it(topic: str, data: st.DataObject) -> None:
    parts = topic.split("/")
    derived = [p if data.draw(st.booleans()) else "+" for p in parts]
    if topic.startswith("$"):
        derived[0] = parts[0]
    assert topic_matches("/".join(derived), topic)
    cut = data.draw(st.integers(0, len(parts)))
    if cut or not topic.startswith("$"):
        assert topic_matches("/".join([*parts[:cut], "#"]), topic)


@settings(max_examples=300, deadline=None)
@given(filter_st(), filter_st(), topic_st)
def test_covered_filters_only_reach_topics_of_the_pattern(
    topic_filter: str, pattern: str, topic: str
) -> None:
    # The soundness the ACL relies on: a covered subscription never sees a topic the
    # permission pattern does not match.
    if filter_covered(topic_filter, pattern) and topic_matches(topic_filter, topic):
        assert topic_matches(pattern, topic)


def test_mqtt_spec_examples() -> None:
    assert topic_matches("sport/tennis/player1/#", "sport/tennis/player1")
    assert topic_matches("sport/tennis/player1/#", "sport/tennis/player1/ranking")
    assert topic_matches("sport/#", "sport")
    assert topic_matches("sport/+", "sport/")
    assert not topic_matches("sport/+", "sport")
    assert topic_matches("+/+", "/finance")
    assert not topic_matches("+", "/finance")
    assert not topic_matches("#", "$SYS/x")
    assert topic_matches("$SYS/#", "$SYS/x")
    for bad in ("a/#/b", "a+", "#a", "a/b#"):
        with pytest.raises(ValueError):
            validate_filter(bad)


def test_topic_names() -> None:
    assert T.director == "fedbus/fed1/director"
    assert T.broadcast == "fedbus/fed1/broadcast"
    assert T.envoy("e1") == "fedbus/fed1/envoy/e1"
    assert T.presence("e1") == "fedbus/fed1/presence/e1"
    assert T.presence_filter == "fedbus/fed1/presence/+"
    for bad in ("", "a/b", "+", "#", "a b", "x" * 65):
        with pytest.raises(ValueError, match="node_id"):
            T.envoy(bad)
    with pytest.raises(ValueError, match="federation"):
        Topics("a/b")


def allows(node: str, role: str, action: str, topic: str) -> bool:
    return acl_allows(federation=F, node_id=node, role=role, action=action, topic=topic)


# (node, role, action, topic, expected): the table of docs/architecture.md, "The bus", both ways.
ACL_MATRIX = [
    ("dir", "director", "publish", T.broadcast, True),
    ("dir", "director", "publish", T.envoy("e1"), True),
    ("dir", "director", "publish", T.director, False),
    ("dir", "director", "publish", T.presence("e1"), False),
    ("dir", "director", "subscribe", T.director, True),
    ("dir", "director", "subscribe", T.presence_filter, True),
    ("dir", "director", "subscribe", T.presence("e1"), True),
    ("dir", "director", "subscribe", T.envoy("e1"), False),
    ("dir", "director", "subscribe", T.broadcast, False),
    ("dir", "director", "subscribe", "fedbus/fed1/#", False),
    ("dir", "director", "subscribe", "#", False),
    ("e1", "envoy", "publish", T.director, True),
    ("e1", "envoy", "publish", T.presence("e1"), True),
    ("e1", "envoy", "publish", T.presence("e2"), False),
    ("e1", "envoy", "publish", T.broadcast, False),
    ("e1", "envoy", "publish", T.envoy("e1"), False),
    ("e1", "envoy", "publish", T.envoy("e2"), False),
    ("e1", "envoy", "subscribe", T.envoy("e1"), True),
    ("e1", "envoy", "subscribe", T.broadcast, True),
    ("e1", "envoy", "subscribe", T.envoy("e2"), False),
    ("e1", "envoy", "subscribe", "fedbus/fed1/envoy/+", False),
    ("e1", "envoy", "subscribe", T.director, False),
    ("e1", "envoy", "subscribe", T.presence_filter, False),
    ("e1", "envoy", "subscribe", "fedbus/+/broadcast", False),
    ("e1", "envoy", "subscribe", "#", False),
    # Another federation's topics, wildcards in published topics, unknown roles/actions.
    ("e1", "envoy", "publish", "fedbus/other/director", False),
    ("dir", "director", "publish", "fedbus/fed1/envoy/+", False),
    ("e1", "admin", "publish", T.director, False),
    ("e1", "envoy", "delete", T.director, False),
    ("e/1", "envoy", "publish", "fedbus/fed1/presence/e/1", False),
]


@pytest.mark.parametrize(("node", "role", "action", "topic", "expected"), ACL_MATRIX)
def test_acl_matrix(node: str, role: str, action: str, topic: str, expected: bool) -> None:
    assert allows(node, role, action, topic) is expected


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["e1", "e2", "dir"]),
    st.sampled_from(["director", "envoy"]),
    st.sampled_from(["publish", "subscribe"]),
    st.lists(
        st.sampled_from(
            ["fedbus", "fed1", "envoy", "presence", "director", "broadcast", "e1", "e2", "+", "#"]
        ),
        min_size=1,
        max_size=5,
    ),
)
def test_acl_never_grants_a_topic_outside_the_rules(
    node: str, role: str, action: str, parts: list[str]
) -> None:
    topic = "/".join(parts)
    if not allows(node, role, action, topic):
        return
    # Every concrete topic the grant reaches must be matched by one of this node's patterns.
    patterns = [p for a, p in acl_patterns(federation=F, role=role, node_id=node) if a == action]
    concrete = [x if x not in ("+", "#") else "e9" for x in parts]
    assert any(topic_matches(p, "/".join(concrete)) for p in patterns)
    # And an envoy's grant never covers another envoy's mailbox or presence.
    if role == "envoy":
        assert not any(topic_matches(topic, t) for t in (T.envoy("e9"), T.presence("e9")))


def test_rules_are_data_for_mosquitto() -> None:
    # The deploy team renders `pattern read|write <topic>` lines from this with %u.
    envoy = acl_patterns(federation=F, role="envoy", node_id="%u")
    assert ("publish", "fedbus/fed1/presence/%u") in envoy
    assert ("subscribe", "fedbus/fed1/envoy/%u") in envoy
    assert len(envoy) == 4
    assert {r.role for r in ACL_RULES} == {"director", "envoy"}
