"""Key files: one reader and writer for Z85 (CurveZMQ) and hex (Ed25519) keys."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.errors import BrokerError
from broker.keys import (
    KeyFileError,
    curve_public_key,
    generate_curve_keypair,
    read_key_file,
    write_key_file,
)
from crypto.signing import generate_signing_keypair


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@given(st.binary(min_size=32, max_size=32))
def test_hex_keys_round_trip(tmp_path_factory: pytest.TempPathFactory, key: bytes) -> None:
    path = tmp_path_factory.mktemp("k") / "signing.key"
    write_key_file(path, key, encoding="hex", secret=True)
    assert read_key_file(path) == key
    assert path.read_text() == key.hex() + "\n"


def test_curve_keys_round_trip_as_text_with_the_right_modes(tmp_path: Path) -> None:
    pair = generate_curve_keypair()
    write_key_file(tmp_path / "curve.key", pair.secret, encoding="z85", secret=True)
    write_key_file(tmp_path / "curve.pub", pair.public, encoding="z85", secret=False)
    assert read_key_file(tmp_path / "curve.key", encoding="z85") == pair.secret
    assert curve_public_key(read_key_file(tmp_path / "curve.key", encoding="z85")) == pair.public
    assert mode(tmp_path / "curve.key") == 0o600
    assert mode(tmp_path / "curve.pub") == 0o644


def test_signing_keys_of_other_sizes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "k"
    write_key_file(path, generate_signing_keypair().private, encoding="hex", secret=True)
    assert len(read_key_file(path)) == 32
    with pytest.raises(KeyFileError, match="32 bytes, expected 16"):
        read_key_file(path, size=16)


@pytest.mark.parametrize(
    ("text", "encoding", "why"),
    [
        ("zz" * 32, "hex", "not a hex key"),
        ("ab" * 31, "hex", "31 bytes, expected 32"),
        ("short", "z85", "40-character Z85"),
        ("~" * 40, "z85", "not valid Z85"),
        (generate_curve_keypair().public, "hex", "not a hex key"),
    ],
)
def test_bad_key_files_name_the_field_and_the_file(
    tmp_path: Path, text: str, encoding: str, why: str
) -> None:
    path = tmp_path / "node.key"
    path.write_text(text + "\n")
    with pytest.raises(KeyFileError, match=why) as info:
        read_key_file(path, encoding=encoding, field="signing_key")  # type: ignore[call-overload]
    assert "signing_key" in str(info.value) and str(path) in str(info.value)


def test_a_missing_or_binary_file_is_a_key_file_error(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot read"):
        read_key_file(tmp_path / "absent.key", encoding="z85")
    (tmp_path / "bin.key").write_bytes(b"\xff\xfe")
    with pytest.raises(KeyFileError, match="not a hex text key"):
        read_key_file(tmp_path / "bin.key")
    # One error root per package, and still the ValueError callers catch.
    assert issubclass(KeyFileError, BrokerError) and issubclass(KeyFileError, ValueError)


def test_writing_refuses_what_it_could_not_read_back(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError):
        write_key_file(tmp_path / "k", "not-z85", encoding="z85", secret=True)
    with pytest.raises(KeyFileError):
        write_key_file(tmp_path / "k", "text", encoding="hex", secret=True)
    assert not (tmp_path / "k").exists()
