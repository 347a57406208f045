"""Secure aggregation for the director: protocol.secagg's SecAggServer behind `Aggregation`.

The server state machine is sans-IO; this adapter only adds what the node knows: which (k, t)
and graph to use for this many participants, the quantisation range, and how to turn the
unmasked Z_2^32 sum into the weighted mean update.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from node.aggregation import (
    AggregateResult,
    Aggregation,
    AggregationError,
    Layout,
    Outgoing,
    decode_update,
    qrange_for,
)
from node.config import SecAggConfig


def params_for(cfg: SecAggConfig, n: int, *, graph_seed: bytes | None = None) -> Any:
    """SecAggParams for `n` participants: the cheapest (k, t) the parameter finder allows.

    Small rounds cannot always tolerate the configured dropout fraction (malicious mode needs
    n - dropouts > n / 2): the tolerated fraction is then lowered one envoy at a time, which
    only means a round with more dropouts aborts (and is retried) instead of completing.
    """
    from protocol.secagg.params import ParameterError, find_parameters

    seed = graph_seed if graph_seed is not None else os.urandom(16)
    fraction = cfg.dropout_fraction
    while True:
        try:
            params = find_parameters(
                n,
                dropout_fraction=fraction,
                corrupt_fraction=cfg.corrupt_fraction,
                malicious=cfg.malicious,
                clip=float(cfg.clip),
                graph_seed=seed,
            )
            break
        except ParameterError:
            dropouts = math.ceil(fraction * n - 1e-12)
            if dropouts <= 0:
                raise
            fraction = (dropouts - 1) / n
    if cfg.graph == "complete" and params.graph != "complete":
        params = msgspec.structs.replace(params, graph="complete", k=n - 1)
    return params


class SecureAggregation(Aggregation):
    secure = True

    def __init__(
        self,
        *,
        round: int,
        participants: Sequence[str],
        layout: Layout,
        min_survivors: int,
        params: Any,
        client_signing_keys: Mapping[str, bytes] | None = None,
    ) -> None:
        from protocol.secagg.server import SecAggServer

        super().__init__(participants, layout, min_survivors)
        self.params = params
        self.qrange = qrange_for(params, len(participants))
        self.server = SecAggServer(
            round,
            params,
            list(participants),
            layout.vector_length,
            dict(client_signing_keys) if params.malicious else None,
        )
        self._refusals_seen = 0

    @classmethod
    def for_round(
        cls,
        *,
        round: int,
        participants: Sequence[str],
        layout: Layout,
        min_survivors: int,
        cfg: SecAggConfig,
        client_signing_keys: Mapping[str, bytes] | None,
    ) -> SecureAggregation:
        return cls(
            round=round,
            participants=participants,
            layout=layout,
            min_survivors=min_survivors,
            params=params_for(cfg, len(participants)),
            client_signing_keys=client_signing_keys,
        )

    @property
    def stage(self) -> str:
        return str(self.server.stage)

    @property
    def done(self) -> bool:
        return bool(self.server.done)

    @property
    def failure(self) -> str | None:
        if not self.server.done:
            return None
        if self.server.aborted:
            return f"secure aggregation aborted: {self.server.abort_reason}"
        if len(self.server.survivors) < self.min_survivors:
            return (
                f"{len(self.server.survivors)} survivors, fewer than the minimum "
                f"{self.min_survivors}"
            )
        return None

    def _wrap(self, outs: list[Any]) -> list[Outgoing]:
        return [Outgoing(o.recipient, o.body) for o in outs]

    def _check_refusal(self) -> None:
        refusals = self.server.refusals
        if len(refusals) > self._refusals_seen:
            last = refusals[-1]
            self._refusals_seen = len(refusals)
            raise AggregationError(f"secagg server refused {last.type}: {last.reason}")

    def receive(self, sender: str, body: Any) -> list[Outgoing]:
        outs = self._wrap(self.server.receive(sender, body))
        self._check_refusal()
        return outs

    def close_stage(self) -> list[Outgoing]:
        return self._wrap(self.server.close_stage())

    def result(self) -> AggregateResult:
        if self.failure or self.server.result is None:
            raise AggregationError(self.failure or "no aggregate")
        survivors = sorted(self.server.survivors)
        total = self.server.result
        mean, loss, _samples = decode_update(self.layout, total, self.qrange, len(survivors))
        return AggregateResult(
            mean_delta=mean,
            survivors=survivors,
            dropouts=sorted(set(self.participants) - set(survivors)),
            train_loss=loss,
            unmasked_sum=total.copy(),
        )
