"""Topic names, MQTT filter matching and the access rules: one source for both transports.

The ZeroMQ broker evaluates `acl_allows` on every subscribe and publish; the Mosquitto
deployment turns the same `ACL_RULES` into `acl_file` patterns (`%u` = the node id), so the
two transports cannot drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Role = Literal["director", "envoy"]
Action = Literal["publish", "subscribe"]

ROLES: tuple[Role, ...] = ("director", "envoy")
ACTIONS: tuple[Action, ...] = ("publish", "subscribe")

# The same alphabet as protocol.types.NodeId: ids become topic levels, file names and
# Mosquitto usernames, so no "/", "+", "#" or whitespace may ever reach a topic.
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

TOPIC_ROOT = "fedbus"


def validate_id(value: str, *, field: str) -> str:
    """Return `value` if it is a safe node/federation id, else raise ValueError naming `field`."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise ValueError(
            f"{field} {value!r} is not a valid id (1-64 characters of A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit)"
        )
    return value


@dataclass(frozen=True)
class Topics:
    """The topic names of one federation (docs/architecture.md, "The bus")."""

    federation: str

    def __post_init__(self) -> None:
        validate_id(self.federation, field="federation")

    @property
    def prefix(self) -> str:
        return f"{TOPIC_ROOT}/{self.federation}"

    @property
    def director(self) -> str:
        return f"{self.prefix}/director"

    @property
    def broadcast(self) -> str:
        return f"{self.prefix}/broadcast"

    def envoy(self, node_id: str) -> str:
        return f"{self.prefix}/envoy/{validate_id(node_id, field='node_id')}"

    def presence(self, node_id: str) -> str:
        return f"{self.prefix}/presence/{validate_id(node_id, field='node_id')}"

    @property
    def presence_filter(self) -> str:
        return f"{self.prefix}/presence/+"


def validate_topic(topic: str) -> str:
    """A topic to publish on: non-empty, no wildcards, no NUL (MQTT 3.1.1 section 4.7)."""
    if not isinstance(topic, str) or not topic:
        raise ValueError("topic must be a non-empty string")
    if "+" in topic or "#" in topic or "\x00" in topic:
        raise ValueError(f"topic {topic!r} may not contain wildcards or NUL")
    if len(topic.encode()) > 65535:
        raise ValueError("topic is longer than 65535 bytes")
    return topic


def validate_filter(topic_filter: str) -> str:
    """A subscription filter: `+` fills a whole level, `#` only as the whole last level."""
    if not isinstance(topic_filter, str) or not topic_filter:
        raise ValueError("topic filter must be a non-empty string")
    if "\x00" in topic_filter or len(topic_filter.encode()) > 65535:
        raise ValueError(f"topic filter {topic_filter!r} contains NUL or is too long")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if level == "#":
            if i != len(levels) - 1:
                raise ValueError(f"topic filter {topic_filter!r}: '#' must be the last level")
        elif level != "+" and ("+" in level or "#" in level):
            raise ValueError(f"topic filter {topic_filter!r}: a wildcard must occupy a whole level")
    return topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching: `+` is exactly one level (possibly empty), `#` is the parent and all below.

    As in MQTT, a filter starting with a wildcard does not match topics starting with `$`.
    """
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    if topic.startswith("$") and f_levels[0] in ("+", "#"):
        return False
    for i, f in enumerate(f_levels):
        if f == "#":
            # "a/#" matches "a" itself too (MQTT 4.7.1.2).
            return True
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


def filter_covered(topic_filter: str, pattern: str) -> bool:
    """True when every topic `topic_filter` can match is matched by `pattern` too.

    This is how a subscription is checked against a permission: "presence/+" is covered by
    "presence/+" but "#" is not, or a single wildcard would read every node's mailbox.
    """
    f_levels = topic_filter.split("/")
    p_levels = pattern.split("/")
    if p_levels[0] in ("+", "#") and f_levels[0].startswith("$"):
        return False  # a leading wildcard never reaches "$" topics (MQTT 4.7.2)
    for i, p in enumerate(p_levels):
        if p == "#":
            return True
        if i >= len(f_levels):
            return False
        f = f_levels[i]
        if f == "#":
            return False
        if p == "+":
            continue
        if f == "+" or f != p:
            return False
    return len(f_levels) == len(p_levels)


@dataclass(frozen=True)
class AclRule:
    """One permission. `pattern` uses `{federation}` and `{node_id}` placeholders."""

    role: Role
    action: Action
    pattern: str

    def topic_pattern(self, *, federation: str, node_id: str) -> str:
        return self.pattern.format(federation=federation, node_id=node_id)


# THE access rules (docs/architecture.md, "The bus"). Nothing else in fedbus grants a permission.
ACL_RULES: tuple[AclRule, ...] = (
    AclRule("director", "publish", "fedbus/{federation}/envoy/+"),
    AclRule("director", "publish", "fedbus/{federation}/broadcast"),
    AclRule("director", "subscribe", "fedbus/{federation}/director"),
    AclRule("director", "subscribe", "fedbus/{federation}/presence/+"),
    AclRule("envoy", "publish", "fedbus/{federation}/director"),
    AclRule("envoy", "publish", "fedbus/{federation}/presence/{node_id}"),
    AclRule("envoy", "subscribe", "fedbus/{federation}/envoy/{node_id}"),
    AclRule("envoy", "subscribe", "fedbus/{federation}/broadcast"),
)


def rules_for(role: str, action: str | None = None) -> tuple[AclRule, ...]:
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {ROLES}")
    return tuple(r for r in ACL_RULES if r.role == role and (action is None or r.action == action))


def acl_patterns(
    *, federation: str, role: str, node_id: str, action: str | None = None
) -> list[tuple[str, str]]:
    """(action, topic pattern) pairs for one node; pass node_id="%u" for Mosquitto patterns."""
    validate_id(federation, field="federation")
    return [
        (r.action, r.topic_pattern(federation=federation, node_id=node_id))
        for r in rules_for(role, action)
    ]


def acl_allows(*, federation: str, node_id: str, role: str, action: str, topic: str) -> bool:
    """May `node_id` (acting as `role`) publish on / subscribe to `topic`?

    For "subscribe", `topic` is a filter and must be entirely inside a permitted pattern.
    Anything malformed (bad id, unknown role or action, wildcard in a published topic) is
    refused rather than raised: the broker calls this on untrusted input.
    """
    if role not in ROLES or action not in ACTIONS:
        return False
    if not (isinstance(node_id, str) and _ID_RE.fullmatch(node_id)):
        return False
    if not (isinstance(federation, str) and _ID_RE.fullmatch(federation)):
        return False
    try:
        if action == "publish":
            validate_topic(topic)
        else:
            validate_filter(topic)
    except ValueError:
        return False
    for rule in ACL_RULES:
        if rule.role != role or rule.action != action:
            continue
        pattern = rule.topic_pattern(federation=federation, node_id=node_id)
        if action == "publish":
            if topic_matches(pattern, topic):
                return True
        elif filter_covered(topic, pattern):
            return True
    return False


def federation_of(topic: str) -> str | None:
    """The federation a fedbus topic belongs to, or None if it is not a fedbus topic."""
    parts = topic.split("/")
    if len(parts) >= 3 and parts[0] == TOPIC_ROOT and _ID_RE.fullmatch(parts[1]):
        return parts[1]
    return None
