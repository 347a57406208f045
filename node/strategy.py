"""Server optimisers: how the director turns the round's mean update into the next model.

Secure aggregation gives the director one thing per round: the sample-weighted mean of
the survivors' updates, delta = mean_i (w_i - w). FedAvg adds it to the global model. The
adaptive federated optimisers of Reddi et al. 2021 ("Adaptive Federated Optimization",
ICLR) treat -delta as a pseudo-gradient and step a server optimiser on it instead; they
need nothing beyond the mean, so they work unchanged under secure aggregation:

* ``fedavg``:  w += eta * delta  (eta = server_lr, 1 is plain FedAvg)
* ``fedavgm``: m = beta * m + delta; w += eta * m  (server momentum, Hsu et al. 2019)
* ``fedadam``: m = b1 m + (1 - b1) delta; v = b2 v + (1 - b2) delta^2;
  w += eta * m / (sqrt(v) + tau)
* ``fedyogi``: as fedadam with v = v - (1 - b2) delta^2 sign(v - delta^2), whose v grows
  additively and so adapts more slowly when the update size jumps.

As in the paper there is no bias correction; v starts at tau^2 (so the first steps are
not huge), m at 0. BatchNorm running statistics are estimates, not parameters: they skip
the optimiser and take the plain mean (w += delta), whatever the strategy. The names of
such entries are given at construction (`buffers`).

Strategies hold state (m, v) that the director checkpoints with the weights; `state()` and
`load_state()` give and take it as plain float32 arrays. Each step computes in float64 from
the float32 state and keeps the new state as float32 (as torch's optimisers keep theirs in
the parameters' dtype), so the state in memory is exactly the state a checkpoint holds: a
strategy is a pure function of (its state, weights, delta), and a director resumed from a
checkpoint continues bit for bit as if it had never stopped.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping
from typing import Annotated, Literal

import msgspec
import numpy as np

STRATEGIES = ("fedavg", "fedavgm", "fedadam", "fedyogi")


class StrategyConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`[strategy]` of the director config (defaults: plain FedAvg)."""

    name: Literal["fedavg", "fedavgm", "fedadam", "fedyogi"] = "fedavg"
    # eta; unset: 1.0 for fedavg / fedavgm, 0.01 for fedadam / fedyogi, which take steps of
    # about eta per coordinate, so eta is a step size in weight units there.
    server_lr: Annotated[float, msgspec.Meta(gt=0, le=100)] | None = None
    momentum: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.9  # fedavgm
    beta1: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.9  # fedadam, fedyogi
    beta2: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.99
    tau: Annotated[float, msgspec.Meta(gt=0)] = 1e-3  # adaptivity floor


def is_buffer_name(name: str) -> bool:
    """BatchNorm running statistics: averaged, never stepped by a server optimiser."""
    return name.endswith((".running_mean", ".running_var"))


class Strategy(abc.ABC):
    """Applies one round's mean update to the global weights."""

    name: str

    def __init__(self, buffers: Iterable[str] = ()) -> None:
        self.buffers = frozenset(buffers)

    def apply(
        self, weights: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The next global weights (new arrays; the inputs are not modified). A delta that
        does not fit the weights is a ValueError before any state changes."""
        if set(weights) != set(delta):
            missing = sorted(set(weights) ^ set(delta))
            raise ValueError(f"update and weights differ in entries: {missing[:5]}")
        for name, w in weights.items():
            if np.shape(w) != np.shape(delta[name]):
                raise ValueError(
                    f"update {name} has shape {np.shape(delta[name])}, weights {np.shape(w)}"
                )
        out: dict[str, np.ndarray] = {}
        for name, w in weights.items():
            w64 = np.asarray(w, np.float64)
            d64 = np.asarray(delta[name], np.float64)
            step = d64 if name in self.buffers else self._step(name, d64)
            out[name] = (w64 + step).astype(np.float32)
        return out

    @abc.abstractmethod
    def _step(self, name: str, delta: np.ndarray) -> np.ndarray:
        """The change of one parameter tensor this round (updates the state)."""

    def state(self) -> dict[str, np.ndarray]:
        """The optimiser state to checkpoint: float32 copies, "<slot>/<weight name>"."""
        return {}

    def load_state(
        self,
        state: Mapping[str, np.ndarray],
        weights: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Continue from `state()` of an earlier instance; with `weights`, every state tensor
        must fit one of them (ValueError otherwise, and nothing is loaded)."""
        if state:
            raise ValueError(f"{self.name} keeps no state, got {sorted(state)[:5]}")


class FedAvg(Strategy):
    name = "fedavg"

    def __init__(self, server_lr: float = 1.0, buffers: Iterable[str] = ()) -> None:
        super().__init__(buffers)
        self.server_lr = server_lr

    def _step(self, name: str, delta: np.ndarray) -> np.ndarray:
        return self.server_lr * delta


class _Stateful(Strategy):
    """State as named float32 arrays: "<slot>/<tensor name>"."""

    slots: tuple[str, ...] = ()

    def __init__(self, buffers: Iterable[str] = ()) -> None:
        super().__init__(buffers)
        self._state: dict[str, np.ndarray] = {}

    def _slot(self, slot: str, name: str, like: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """A float64 working copy of one state tensor (`fill` before its first step)."""
        key = f"{slot}/{name}"
        kept = self._state.get(key)
        if kept is None:
            return np.full(like.shape, fill, np.float64)
        if kept.shape != like.shape:
            raise ValueError(f"state {key} has shape {kept.shape}, not {like.shape}")
        return kept.astype(np.float64)

    def _keep(self, slot: str, name: str, value: np.ndarray) -> None:
        self._state[f"{slot}/{name}"] = value.astype(np.float32)

    def state(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._state.items()}

    def load_state(
        self,
        state: Mapping[str, np.ndarray],
        weights: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        bad = [k for k in state if k.split("/", 1)[0] not in self.slots]
        if bad:
            raise ValueError(f"{self.name} has no state {bad[:5]}")
        loaded: dict[str, np.ndarray] = {}
        for k, v in state.items():
            arr = np.array(v, np.float32)
            if not np.isfinite(arr).all():
                raise ValueError(f"state {k} is not finite")
            if weights is not None:
                _check_fits(k, arr, weights, self.buffers)
            loaded[k] = arr
        self._state = loaded


def _check_fits(
    key: str, state: np.ndarray, weights: Mapping[str, np.ndarray], buffers: frozenset[str]
) -> None:
    """A state tensor must belong to a stepped weight of the same shape: state kept for
    another model would otherwise surface as a shape error in the middle of a round."""
    name = key.split("/", 1)[1] if "/" in key else ""
    if name not in weights or name in buffers:
        raise ValueError(f"state {key} belongs to no weight the strategy steps")
    if state.shape != np.shape(weights[name]):
        raise ValueError(
            f"state {key} has shape {state.shape}, the weight {np.shape(weights[name])}"
        )


class FedAvgM(_Stateful):
    name = "fedavgm"
    slots = ("momentum",)

    def __init__(
        self, server_lr: float = 1.0, momentum: float = 0.9, buffers: Iterable[str] = ()
    ) -> None:
        super().__init__(buffers)
        self.server_lr, self.momentum = server_lr, momentum

    def _step(self, name: str, delta: np.ndarray) -> np.ndarray:
        m: np.ndarray = self.momentum * self._slot("momentum", name, delta) + delta
        self._keep("momentum", name, m)
        step: np.ndarray = self.server_lr * m
        return step


class FedAdam(_Stateful):
    name = "fedadam"
    slots = ("m", "v")

    def __init__(
        self,
        server_lr: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        buffers: Iterable[str] = (),
    ) -> None:
        super().__init__(buffers)
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1 - self.beta2) * d2

    def _step(self, name: str, delta: np.ndarray) -> np.ndarray:
        m = self.beta1 * self._slot("m", name, delta) + (1 - self.beta1) * delta
        v = self._second_moment(self._slot("v", name, delta, fill=self.tau**2), delta * delta)
        self._keep("m", name, m)
        self._keep("v", name, v)
        step: np.ndarray = self.server_lr * m / (np.sqrt(v) + self.tau)
        return step


class FedYogi(FedAdam):
    name = "fedyogi"

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        out: np.ndarray = v - (1 - self.beta2) * d2 * np.sign(v - d2)
        return out


def build_strategy(cfg: StrategyConfig, buffers: Iterable[str] = ()) -> Strategy:
    """The strategy `cfg` names; `buffers` are the entries that always take the plain mean."""
    adaptive = cfg.name in ("fedadam", "fedyogi")
    lr = cfg.server_lr if cfg.server_lr is not None else (1e-2 if adaptive else 1.0)
    if cfg.name == "fedavg":
        return FedAvg(lr, buffers)
    if cfg.name == "fedavgm":
        return FedAvgM(lr, cfg.momentum, buffers)
    if cfg.name == "fedadam":
        return FedAdam(lr, cfg.beta1, cfg.beta2, cfg.tau, buffers)
    if cfg.name == "fedyogi":
        return FedYogi(lr, cfg.beta1, cfg.beta2, cfg.tau, buffers)
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {cfg.name!r}")
