"""The base of every message body; in its own module so protocol/secagg can subclass it too."""

from __future__ import annotations

import msgspec


class Message(msgspec.Struct, tag_field="type", tag=True, forbid_unknown_fields=True, frozen=True):
    """Base of every message body; the subclass name is its wire `type`."""
