"""Atomic files: the target holds the old or the new content, never a mix, and no temp is left."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from broker.files import atomic_path, atomic_write_bytes, durable_append, read_toml
from protocol.configfile import ConfigError


def test_write_replaces_with_requested_mode(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "key"
    atomic_write_bytes(target, b"old")
    old_umask = os.umask(0)
    try:
        atomic_write_bytes(target, b"secret", mode=0o600)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"secret"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == ["key"]


def test_failed_write_keeps_old_content_and_leaves_no_temp(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "checkpoint"
    atomic_write_bytes(target, b"good")

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def test_atomic_path_renames_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "plot.png"
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path
        tmp.write_bytes(b"png")
    assert target.read_bytes() == b"png"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("plotting failed")
    assert target.read_bytes() == b"png"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_read_toml_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.toml: config file not found"):
        read_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("a = [")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        read_toml(bad)
    with pytest.raises(ConfigError, match="is a folder"):
        read_toml(tmp_path)


def test_durable_append_adds_to_the_end_with_the_mode_and_refuses_symlinks(tmp_path: Path) -> None:
    log = tmp_path / "log"
    durable_append(log, b"one\n", mode=0o600)
    durable_append(log, b"two\n", mode=0o644)  # the mode is the new file's only
    assert log.read_bytes() == b"one\ntwo\n"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    (tmp_path / "link").symlink_to(log)
    with pytest.raises(OSError):
        durable_append(tmp_path / "link", b"three\n")
    assert log.read_bytes() == b"one\ntwo\n"


def test_atomic_path_never_exposes_a_secret_while_it_is_written(tmp_path: Path) -> None:
    """np.save and friends open the path themselves: the file they write into must already
    carry the final mode, whatever the umask (issue #11: --audit files were readable)."""
    seen: list[int] = []
    old_umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "audit.npy", mode=0o600) as tmp, open(tmp, "wb") as fh:
            fh.write(b"secret")  # what np.save(tmp, ...) does
            seen.append(stat.S_IMODE(os.fstat(fh.fileno()).st_mode))
    finally:
        os.umask(old_umask)
    assert seen == [0o600]
    assert stat.S_IMODE((tmp_path / "audit.npy").stat().st_mode) == 0o600


def test_private_dir_is_for_its_owner_only(tmp_path: Path) -> None:
    from broker.files import private_dir

    folder = tmp_path / "a" / "audit"
    folder.parent.mkdir()
    folder.mkdir(mode=0o755)
    assert private_dir(folder) == folder
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
