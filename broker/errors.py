"""The root of every error the broker package raises (bus, daemons, fault plans, Mosquitto)."""

from __future__ import annotations

__all__ = ["BrokerError"]


class BrokerError(Exception):
    """Base class of the broker package's errors."""
