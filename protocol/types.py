"""Constrained scalar types shared by every message."""

from __future__ import annotations

from typing import Annotated

import msgspec

# Node ids appear in topics, file names and ACL patterns: keep them to a safe alphabet.
NodeId = Annotated[
    str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
]
FederationId = NodeId
MessageId = Annotated[bytes, msgspec.Meta(min_length=8, max_length=32)]
Round = Annotated[int, msgspec.Meta(ge=0, le=2**31)]
Count = Annotated[int, msgspec.Meta(ge=0, le=2**40)]
ShortText = Annotated[str, msgspec.Meta(max_length=512)]
