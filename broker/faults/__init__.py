"""Faults on purpose: the seeded fault plan (`plan`) and the bus wrapper that applies it
(`bus`). `from broker.faults import FaultPlan, FaultyBus` is the harness API."""

from broker.faults.bus import FaultyBus, FaultySubscription, corrupt_bytes
from broker.faults.plan import (
    ANY_NODE,
    BrokerRestart,
    CrashFault,
    FaultPlan,
    FaultPlanError,
    LinkFault,
    PartitionFault,
    crash_if_planned,
)

__all__ = [
    "ANY_NODE",
    "BrokerRestart",
    "CrashFault",
    "FaultPlan",
    "FaultPlanError",
    "FaultyBus",
    "FaultySubscription",
    "LinkFault",
    "PartitionFault",
    "corrupt_bytes",
    "crash_if_planned",
]
