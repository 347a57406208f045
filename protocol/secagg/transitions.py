"""The SecAgg state transitions of client and server, as tables (in the manner of h11's _state.py).

A machine is in one of the SecAgg stages (protocol.stages.Stage) until it ends in an `Outcome`.
Each table maps (state, message type) to the state that follows; a message whose pair is not in
its machine's table is refused without a state change. The handlers that check a message's
meaning live with the machines (client.py, server.py); what may follow what lives only here.

Client (`stage` = where the client is; it waits there for the server's next message):

    advertise_keys --KeyRoster-->          share_keys     (sends ShareKeys)
    share_keys     --ForwardedShares-->    masked_input   (sends MaskedInput once its input is set)
    masked_input   --MaskedInput (sent)--> consistency
    consistency    --ConsistencyRequest--> unmask         (sends its signature)
    unmask         --UnmaskRequest-->      done           (sends UnmaskResponse)
    any            --Abort-->              aborted

Server (`stage` = the stage whose client messages it collects; the stage closes when everybody
expected answered or its deadline passed, and the message that opens the next one goes out):

    advertise_keys --AdvertiseKeys...-->         share_keys     (broadcasts KeyRoster)
    share_keys     --ShareKeys...-->             masked_input   (forwards the shares)
    masked_input   --MaskedInput...-->           consistency    (broadcasts ConsistencyRequest)
    consistency    --ConsistencySignature...-->  unmask         (broadcasts UnmaskRequest)
    unmask         --UnmaskResponse...-->        done           (reconstructs the sum)
    any            (fewer than t left)           aborted        (broadcasts Abort)

The consistency stage exists only in the malicious-director mode: without it, `advance` goes
from masked_input straight to unmask, on both sides.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import Final

from protocol.base import Message
from protocol.secagg.messages import (
    SecAggAdvertiseKeys,
    SecAggConsistencyRequest,
    SecAggConsistencySignature,
    SecAggForwardedShares,
    SecAggKeyRoster,
    SecAggMaskedInput,
    SecAggShareKeys,
    SecAggUnmaskRequest,
    SecAggUnmaskResponse,
)
from protocol.stages import Stage

__all__ = [
    "CLIENT_ENTERS",
    "CLIENT_SENDS",
    "CLIENT_TRANSITIONS",
    "SERVER_TRANSITIONS",
    "Aborted",
    "Outcome",
    "State",
    "advance",
]


class Outcome(StrEnum):
    """How a machine ended."""

    DONE = "done"
    ABORTED = "aborted"


State = Stage | Outcome
Transitions = Mapping[tuple[State, type[Message]], State]

CLIENT_TRANSITIONS: Final[Transitions] = MappingProxyType(
    {
        (Stage.ADVERTISE_KEYS, SecAggKeyRoster): Stage.SHARE_KEYS,
        (Stage.SHARE_KEYS, SecAggForwardedShares): Stage.MASKED_INPUT,
        (Stage.MASKED_INPUT, SecAggMaskedInput): Stage.CONSISTENCY,
        (Stage.CONSISTENCY, SecAggConsistencyRequest): Stage.UNMASK,
        (Stage.UNMASK, SecAggUnmaskRequest): Outcome.DONE,
    }
)

SERVER_TRANSITIONS: Final[Transitions] = MappingProxyType(
    {
        (Stage.ADVERTISE_KEYS, SecAggAdvertiseKeys): Stage.SHARE_KEYS,
        (Stage.SHARE_KEYS, SecAggShareKeys): Stage.MASKED_INPUT,
        (Stage.MASKED_INPUT, SecAggMaskedInput): Stage.CONSISTENCY,
        (Stage.CONSISTENCY, SecAggConsistencySignature): Stage.UNMASK,
        (Stage.UNMASK, SecAggUnmaskResponse): Outcome.DONE,
    }
)

# Where a client is in the round, seen from outside (fault plans crash an envoy at these
# points, simulations drop clients at them): it enters a stage when the server's message that
# opens it arrives, and ends the stage by sending its own message of that stage.
CLIENT_ENTERS: Final[Mapping[type[Message], Stage]] = MappingProxyType(
    {
        SecAggKeyRoster: Stage.SHARE_KEYS,
        SecAggForwardedShares: Stage.MASKED_INPUT,
        SecAggConsistencyRequest: Stage.CONSISTENCY,
        SecAggUnmaskRequest: Stage.UNMASK,
    }
)
CLIENT_SENDS: Final[Mapping[type[Message], Stage]] = MappingProxyType(
    {
        SecAggAdvertiseKeys: Stage.ADVERTISE_KEYS,
        SecAggShareKeys: Stage.SHARE_KEYS,
        SecAggMaskedInput: Stage.MASKED_INPUT,
        SecAggConsistencySignature: Stage.CONSISTENCY,
        SecAggUnmaskResponse: Stage.UNMASK,
    }
)


def advance(table: Transitions, state: State, kind: type[Message], *, malicious: bool) -> State:
    """The state after a `kind` message in `state` (KeyError if the table has no such step)."""
    after = table[(state, kind)]
    if after is Stage.CONSISTENCY and not malicious:
        return Stage.UNMASK
    return after


class Aborted(Exception):
    """Raised by a machine's handler when the round cannot go on; never leaves the machine,
    which ends in Outcome.ABORTED."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
