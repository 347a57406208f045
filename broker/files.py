"""Files on disk: written atomically, read with clear errors.

Nothing fedbus saves may ever be seen half-written: every writer goes through
`atomic_write_bytes` (or `atomic_path` for libraries that insist on writing to a path
themselves, such as matplotlib and numpy). The data goes to a temporary file in the same
folder, created with its final mode, is fsynced, renamed over the target, and the folder is
fsynced so the rename survives a power cut. On any error the temporary file is removed and
the old content stays.

This lives in broker/ because broker is the lowest layer allowed to touch the OS (crypto and
protocol are pure); every layer above uses it.
"""

from __future__ import annotations

import contextlib
import os
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from protocol.configfile import ConfigError

__all__ = [
    "PRIVATE_DIR_MODE",
    "PUBLIC_MODE",
    "SECRET_MODE",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "durable_append",
    "private_dir",
    "read_toml",
]

# The two modes fedbus writes files with: secrets (keys, passwords) for their owner only,
# everything else (configs, certificates, public keys, reports) readable by all.
SECRET_MODE = 0o600
PUBLIC_MODE = 0o644
# A folder of secrets (kits, audit files): only its owner may list or enter it.
PRIVATE_DIR_MODE = 0o700


def private_dir(path: str | os.PathLike[str]) -> Path:
    """`path` as a folder only its owner can list or enter (created with its parents)."""
    path = Path(path)
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, PRIVATE_DIR_MODE)
    return path


def _temp_name(path: Path) -> Path:
    # Hidden, per-process, and ending in the target's suffix (matplotlib picks the format
    # from it).
    return path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(
    path: str | os.PathLike[str], data: bytes, *, mode: int = PUBLIC_MODE
) -> Path:
    """Replace `path` by `data`: readers see the old or the new content, never a mix.

    `mode` is set on the temporary file before any byte is written, so a secret is never
    readable by others, not even for an instant. Symlinks at the temporary name are refused.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        try:
            os.fchmod(fd, mode)  # the umask must not loosen or tighten what was asked for
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def durable_append(path: str | os.PathLike[str], data: bytes, *, mode: int = PUBLIC_MODE) -> Path:
    """Append `data` to `path` (created with `mode`) and fsync it before returning.

    For append-only logs: a crash can tear only the last record, so each record must carry
    its own integrity check (node.roundlog's checksums). Symlinks at `path` are refused.
    """
    path = Path(path)
    new = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, mode)
    try:
        if new:
            os.fchmod(fd, mode)
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if new:
        _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, *, mode: int = PUBLIC_MODE) -> Path:
    """`atomic_write_bytes` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, mode: int = PUBLIC_MODE) -> Iterator[Path]:
    """A temporary path to write to; renamed over `path` when the block ends without error.

    For writers that only take a path (``fig.savefig(tmp)``, ``np.save(tmp, ...)``): the file
    is fsynced, given `mode` and renamed; on an exception it is removed and `path` untouched.
    The temporary file exists with `mode` before the writer opens it (writers truncate, they
    keep the mode), so a secret is never readable by others while it is being written.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(target)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The table of a TOML file; ConfigError names the file when it is missing or not TOML."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML (not UTF-8: {exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
