"""A scripted malicious director on the in-memory bus, against the real Envoy class.

It holds the director's signing key (the envoys accept its frames: it *is* their director),
sends whatever RoundStart or EvaluateRequest it likes, and reads every frame the envoys send.
`run_secagg` plays the server side of a SecAgg session with the real SecAggServer, optionally
throwing away some envoys' masked inputs, so a test can attempt the differencing attacks of
issue #11 exactly as a hostile director would.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any

import numpy as np

from broker.keys import read_key_file
from broker.topics import Topics
from node.endpoint import Endpoint
from protocol.codec import Codec
from protocol.events import BROADCAST
from protocol.messages import Body, Envelope, RoundStart, TrainPlan
from protocol.secagg.messages import SecAggMaskedInput, SecAggParams
from protocol.secagg.server import SecAggServer
from protocol.tensors import state_from_numpy
from tests.node.nodeharness import FED, Fed, initial


class ScriptedDirector:
    def __init__(self, fed: Fed) -> None:
        self.fed = fed
        self.topics = Topics(FED)
        cfg = fed.director_cfg
        assert cfg.signing_key is not None
        self.envoy_keys = {k: read_key_file(v) for k, v in cfg.envoy_signing_keys.items()}
        self.endpoint = Endpoint(
            fed.broker.connect("director"),
            node_id="director",
            federation=FED,
            codec=Codec(cfg.max_frame_bytes),
            signing_key=read_key_file(cfg.signing_key),
            peer_keys=self.envoy_keys,
            require_signatures=True,
        )
        self.received: list[Envelope] = []
        self._new = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ScriptedDirector:
        assert self.endpoint.bus is not None
        sub = self.endpoint.bus.subscribe(self.topics.director)
        self._reader = asyncio.create_task(self._read(sub))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def _read(self, sub: Any) -> None:
        async for frame in sub:
            env = self.endpoint.accept(frame)
            if env is not None:
                self.received.append(env)
                self._new.set()

    async def send(self, body: Body, *, round: int, to: str = BROADCAST) -> None:
        topic = self.topics.broadcast if to == BROADCAST else self.topics.envoy(to)
        await self.endpoint.send(topic, round=round, recipient=to, body=body)

    def of_type(self, kind: type, *, session: int | None = None) -> list[Envelope]:
        return [
            e
            for e in self.received
            if isinstance(e.body, kind)
            and (session is None or getattr(e.body, "round", None) == session)
        ]

    async def wait_for(
        self, kind: type, count: int, *, session: int | None = None, timeout: float = 10.0
    ) -> list[Envelope]:
        """At least `count` messages of `kind` (of one SecAgg session), or what came meanwhile."""
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.of_type(kind, session=session)) < count:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            self._new.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new.wait(), left)
        return self.of_type(kind, session=session)

    async def settle(self, seconds: float = 0.5) -> None:
        """Give the envoys time to answer (or, as a test expects, not to)."""
        await asyncio.sleep(seconds)

    def round_start(
        self,
        *,
        params: SecAggParams | None,
        attempt: int = 0,
        selected: Iterable[str] | None = None,
        weights: dict[str, np.ndarray] | None = None,
        plan: TrainPlan | None = None,
        **extra: Any,
    ) -> RoundStart:
        return RoundStart(
            weights=state_from_numpy(weights if weights is not None else initial()),
            selected=sorted(selected if selected is not None else self.fed.envoy_cfgs),
            plan=plan or TrainPlan(local_epochs=1, batch_size=4, lr=0.1),
            deadlines={"training": 5.0},
            secagg=params,
            attempt=attempt,
            **extra,
        )

    async def run_secagg(
        self,
        server: SecAggServer,
        round: int,
        *,
        ignore_masked_from: Iterable[str] = (),
        stage_timeout: float = 3.0,
    ) -> SecAggServer:
        """Drive `server` with the envoys' messages of its session until it is done; the
        masked inputs of `ignore_masked_from` are thrown away (they "dropped out")."""
        ignore = set(ignore_masked_from)
        seen = 0
        while not server.done:
            stage = server.stage
            deadline = asyncio.get_running_loop().time() + stage_timeout
            while server.stage == stage and not server.done:
                fresh = [
                    e
                    for e in self.received[seen:]
                    if getattr(e.body, "round", None) == server.round
                ]
                seen = len(self.received)
                for env in fresh:
                    if isinstance(env.body, SecAggMaskedInput) and env.sender in ignore:
                        continue
                    for out in server.receive(env.sender, env.body):
                        await self.send(out.body, round=round, to=out.recipient)
                if server.stage != stage or server.done:
                    break
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    for out in server.close_stage():
                        await self.send(out.body, round=round, to=out.recipient)
                    break
                self._new.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._new.wait(), min(left, 0.2))
        return server
