"""Loopback ports for brokers started here (tests, the demo): pick one, wait for a listener.

A port picked free can be taken by another process before our broker binds it; callers
that start brokers retry on `ADDRESS_IN_USE` in the broker's error or log.
"""

from __future__ import annotations

import errno
import os
import socket

__all__ = ["ADDRESS_IN_USE", "accepts", "free_port"]

ADDRESS_IN_USE = os.strerror(errno.EADDRINUSE)  # "Address already in use", as logs print it


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def accepts(host: str, port: int) -> bool:
    """Does something accept TCP connections on host:port?"""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False
