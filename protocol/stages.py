"""The stages of a round: one vocabulary for deadlines, fault plans, logs and status.

A round is local training followed by the SecAgg client stages (Bonawitz et al. 2017) and the
federated evaluation of the new model. Every place that names a stage (RoundStart deadlines,
`[[crash]] stage = ...` in fault plans, the envoy's and director's bound log context,
status.json) uses these values, so a typo is a validation error rather than a silent no-op.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["CRASH_STAGES", "SECAGG_STAGES", "Stage"]


class Stage(StrEnum):
    TRAINING = "training"
    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"
    EVALUATE = "evaluate"


# The SecAgg client stages, in protocol order.
SECAGG_STAGES: tuple[Stage, ...] = (
    Stage.ADVERTISE_KEYS,
    Stage.SHARE_KEYS,
    Stage.MASKED_INPUT,
    Stage.CONSISTENCY,
    Stage.UNMASK,
)
# Where a fault plan's [[crash]] may stop an envoy: entering one of these stages.
CRASH_STAGES: tuple[Stage, ...] = (Stage.TRAINING, *SECAGG_STAGES)
