"""The root of every error the node package raises, and the exit codes of `fedbus` commands.

Every `fedbus` command ends with one of `ExitCode` (the README's "Exit codes" table is this
enum). Each FedbusError subclass names the code its command exits with, so the CLI maps
errors to exit codes in one place instead of every command choosing numbers.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["ExitCode", "FedbusError"]


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1  # an unexpected error (a bug): the traceback is logged
    USAGE = 2  # bad command-line arguments (argparse's convention)
    CONFIG = 3  # a config, key or data file that cannot be used; the message names it
    BUS_UNREACHABLE = 4  # the broker could not be reached or refused the credentials
    ROUND_FAILED = 5  # a round failed every attempt
    QUORUM_LOST = 6  # too few envoys stayed online for longer than the configured bound
    STATE = 7  # the state folder is unusable: corrupt checkpoint, locked, disk full, read-only
    AUDIT_FAILED = 8  # --audit: an unmasked sum differs from the survivors' updates
    INTERRUPTED = 130  # SIGINT (128 + 2); SIGTERM exits 143 (128 + 15)


class FedbusError(Exception):
    """Base class of the node package's errors."""

    exit_code: ExitCode = ExitCode.FAILURE
