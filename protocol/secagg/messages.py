"""SecAgg stage messages (Bonawitz et al. 2017, with the SecAgg+ graph of Bell et al. 2020).

Proposal skeleton: the secure-aggregation work owns and may reshape these structs, but keeps the
names `SecAggParams` and `SECAGG_MESSAGES` (every stage message, for the envelope's union).
"""

from __future__ import annotations

import msgspec

from protocol.types import NodeId


class SecAggParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    graph: str  # "complete" | "harary"
    k: int
    t: int
    clip: float
    malicious: bool = True


SECAGG_MESSAGES: tuple[type, ...] = ()
__all__ = ["SECAGG_MESSAGES", "NodeId", "SecAggParams"]
