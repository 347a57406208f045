"""Config documents: TOML written by dump_toml reads back identically; errors name the source."""

from __future__ import annotations

import tomllib
from typing import Annotated

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.configfile import ConfigError, convert_config, dump_toml, parse_toml
from protocol.errors import ProtocolError

keys = st.text(min_size=1, max_size=12)
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
)
values = st.recursive(
    st.one_of(scalars, st.lists(scalars, max_size=4)),
    lambda inner: st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)
tables = st.dictionaries(
    keys,
    st.one_of(
        values,
        st.lists(st.dictionaries(keys, scalars, min_size=1, max_size=3), min_size=1, max_size=3),
    ),
    max_size=6,
)


@given(tables)
def test_dump_toml_round_trips(table: dict) -> None:
    assert tomllib.loads(dump_toml(table)) == table


def test_dump_toml_leaves_out_none() -> None:
    assert tomllib.loads(dump_toml({"a": None, "b": {"c": None, "d": 1}})) == {"b": {"d": 1}}


class _Doc(msgspec.Struct, forbid_unknown_fields=True):
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]

    def __post_init__(self) -> None:
        if self.port == 13:
            raise ValueError("port 13 is unlucky")


def test_convert_config_names_source_and_field() -> None:
    with pytest.raises(ConfigError, match=r"broker\.toml: .*\$\.port"):
        convert_config({"port": 0}, _Doc, source="broker.toml")
    with pytest.raises(ConfigError, match=r"broker\.toml: .*unlucky"):
        convert_config({"port": 13}, _Doc, source="broker.toml")
    with pytest.raises(ConfigError, match="unknown field"):
        convert_config({"port": 1, "prot": 2}, _Doc, source="broker.toml")
    assert convert_config({"port": 1883}, _Doc, source="x").port == 1883


def test_parse_toml_error_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match=r"plan\.toml: not valid TOML"):
        parse_toml("seed = = 7", source="plan.toml")
