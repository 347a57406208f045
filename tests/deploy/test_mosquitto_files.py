"""The generated Mosquitto files: passwords in Mosquitto's own format, an ACL equal to the rules."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.server.mosquitto_files import (
    AclFile,
    Listener,
    MosquittoConfig,
    hash_password,
    parse_passwd,
    render_acl,
    render_conf,
    render_passwd,
    verify_password,
)
from broker.topics import ACL_RULES, Topics, acl_allows

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,11}", fullmatch=True)
passwords = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FFF, exclude_characters=":"),
    min_size=1,
    max_size=40,
)


@settings(max_examples=50, deadline=None)
@given(passwords, passwords)
def test_password_hash_verifies_only_its_password(password: str, other: str) -> None:
    hashed = hash_password(password, iterations=10)
    assert hashed.startswith("$7$10$")
    assert verify_password(hashed, password)
    assert verify_password(hashed, other) == (other == password)


def test_our_hash_format_is_mosquitto_passwd_s() -> None:
    """mosquitto_passwd's own output verifies with our code, so the formats agree."""
    tool = shutil.which("mosquitto_passwd")
    assert tool is not None, "mosquitto_passwd ships with the mosquitto package"
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pw"
        subprocess.run([tool, "-c", "-b", str(path), "alice", "s3cret-Ω"], check=True)
        entry = parse_passwd(path.read_text())["alice"]
    assert entry.startswith("$7$")
    assert verify_password(entry, "s3cret-Ω")
    assert not verify_password(entry, "s3cret")


def test_rendered_passwd_parses_and_refuses_bad_input() -> None:
    text = render_passwd({"b": "pw-b", "a": "pw-a"}, iterations=5)
    entries = parse_passwd(text)
    assert list(entries) == ["a", "b"]
    assert verify_password(entries["a"], "pw-a") and not verify_password(entries["a"], "pw-b")
    with pytest.raises(ValueError, match="username"):
        render_passwd({"a/b": "x"})
    with pytest.raises(ValueError, match="spans lines"):
        render_passwd({"a": "x\ny"})
    with pytest.raises(ValueError, match="line 2"):
        parse_passwd("a:$7$1$x$y\nbroken line\n")


def test_acl_uses_u_patterns_for_per_node_rules() -> None:
    text = render_acl(federation="fl", nodes={"director": "director", "a": "envoy"})
    patterns = [line for line in text.splitlines() if line.startswith("pattern ")]
    per_node = [r for r in ACL_RULES if "{node_id}" in r.pattern]
    assert len(patterns) == len(per_node) > 0
    assert all("%u" in p for p in patterns)
    assert "user director" in text and "user a" in text


def _topic_space(federation: str, nodes: list[str]) -> list[str]:
    t = Topics(federation)
    space = [t.director, t.broadcast, f"fedbus/{federation}/other", "fedbus/elsewhere/director"]
    for node in [*nodes, "stranger"]:
        space += [t.envoy(node), t.presence(node)]
    return space


@settings(max_examples=25, deadline=None)
@given(
    st.lists(ids, min_size=1, max_size=5, unique=True).flatmap(
        lambda envoys: st.tuples(
            st.just(envoys),
            ids.filter(lambda d: d not in envoys),
        )
    )
)
def test_acl_file_delivers_exactly_what_the_rules_allow(case: tuple[list[str], str]) -> None:
    """For every sender, receiver and topic: Mosquitto (as its ACL check evaluates the
    generated file) carries a frame iff `acl_allows` lets the sender publish it and the
    receiver subscribe to it. That is the observable contract of an ACL."""
    envoys, director = case
    nodes = {director: "director", **{e: "envoy" for e in envoys}}
    acl = AclFile.parse(render_acl(federation="fl", nodes=nodes))

    def rules(node: str, action: str, topic: str) -> bool:
        return acl_allows(
            federation="fl", node_id=node, role=nodes[node], action=action, topic=topic
        )

    delivered = 0
    for topic in _topic_space("fl", list(nodes)):
        for sender in nodes:
            for receiver in nodes:
                if receiver == sender:
                    continue
                by_mosquitto = acl.allows(sender, "write", topic) and acl.allows(
                    receiver, "read", topic
                )
                by_rules = rules(sender, "publish", topic) and rules(receiver, "subscribe", topic)
                assert by_mosquitto == by_rules, (sender, receiver, topic)
                delivered += by_rules
    # Each envoy can reach the director and back: the matrix is not trivially empty.
    assert delivered >= 3 * len(envoys)


def test_acl_refuses_unknown_roles_and_ids() -> None:
    with pytest.raises(ValueError, match="role"):
        render_acl(federation="fl", nodes={"a": "admin"})
    with pytest.raises(ValueError):
        render_acl(federation="fl", nodes={"a/b": "envoy"})


def test_conf_has_no_anonymous_listener_and_the_frame_limit(tmp_path: Path) -> None:
    conf = render_conf(
        MosquittoConfig(
            listeners=(Listener(port=1884), Listener(port=8884, address="0.0.0.0")),
            password_file=tmp_path / "pw",
            acl_file=tmp_path / "acl",
            data_dir=tmp_path / "data",
            max_frame_bytes=12345,
        )
    )
    lines = conf.splitlines()
    assert lines.count("allow_anonymous false") == 2
    assert "message_size_limit 12345" in lines
    # Every client's queue is bounded, in messages and in bytes (never 0 = unlimited).
    assert "max_queued_messages 100000" in lines and "max_queued_bytes 268435456" in lines
    assert "per_listener_settings true" in lines
    # Listener options before the first `listener` line would open the default port 1883.
    first_listener = next(i for i, line in enumerate(lines) if line.startswith("listener "))
    head = lines[:first_listener]
    for option in ("allow_anonymous", "password_file", "acl_file", "allow_zero_length_clientid"):
        assert not any(line.startswith(option) for line in head)
    with pytest.raises(ValueError):
        render_conf(
            MosquittoConfig(
                listeners=(), password_file=tmp_path, acl_file=tmp_path, data_dir=tmp_path
            )
        )
    for unbounded in ({"max_queued_bytes": 0}, {"max_queued_messages": 0}):
        with pytest.raises(ValueError, match="unbounded"):
            render_conf(
                MosquittoConfig(
                    listeners=(Listener(port=1884),),
                    password_file=tmp_path,
                    acl_file=tmp_path,
                    data_dir=tmp_path,
                    **unbounded,
                )
            )
