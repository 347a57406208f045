"""Server optimisers and FedProx in a running federation: the director's [strategy] moves the
model as the closed form says, its state survives --resume exactly, and [train] prox_mu
reaches the envoys' trainers (production director and envoy code, in-memory bus)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from node.checkpoint import load_checkpoint
from node.director import Director, DirectorError
from protocol.messages import TrainPlan
from tests.node.nodeharness import Fed, initial, make_fed


async def run(fed: Fed, weights: dict[str, np.ndarray] | None = None, **kw: Any) -> int:
    for name in fed.envoy_cfgs:
        fed.start_envoy(name)
    bus = fed.broker.connect(fed.director_cfg.node_id)
    director = Director(fed.director_cfg, bus, weights=weights or initial(), **kw)
    try:
        return await asyncio.wait_for(director.run(), 120)
    finally:
        await fed.stop()


def mean_target(fed: Fed) -> float:
    """The sample-weighted mean of the envoys' targets: each NumpyTrainer moves every weight
    half way to its target, so a round's mean update is 0.5 (mean_target - w), exactly."""
    total = sum(t.num_samples for t in fed.trainers.values())
    return sum(t.num_samples * t.target for t in fed.trainers.values()) / total


FEDAVGM = {"name": "fedavgm", "server_lr": 0.8, "momentum": 0.5}


def fedavgm_by_hand(fed: Fed, rounds: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Weights and momentum after `rounds` rounds of FedAvgM (FEDAVGM), in float64."""
    target = mean_target(fed)
    w = {k: v.astype(np.float64) for k, v in initial().items()}
    m = {k: np.zeros_like(v) for k, v in w.items()}
    for _ in range(rounds):
        for k in w:
            m[k] = 0.5 * m[k] + 0.5 * (target - w[k])
            w[k] = w[k] + 0.8 * m[k]
    return w, m


async def test_fedavgm_rounds_follow_the_closed_form(tmp_path: Path) -> None:
    fed = make_fed(tmp_path, 3, secure=False, rounds=2, strategy=FEDAVGM)
    assert await run(fed) == 0
    ckpt = load_checkpoint(fed.director_cfg.state_dir)
    assert ckpt is not None and ckpt.round == 2
    want, momentum = fedavgm_by_hand(fed, 2)
    for k, v in ckpt.weights_numpy().items():
        np.testing.assert_allclose(v, want[k], rtol=1e-6, atol=1e-6)
    # Plain FedAvg would be somewhere else: momentum and server_lr took effect.
    target = mean_target(fed)
    fedavg = {k: target + (v - target) * 0.25 for k, v in initial().items()}
    assert all(np.abs(ckpt.weights_numpy()[k] - fedavg[k]).min() > 0.05 for k in fedavg)
    # The momentum is checkpointed with the weights.
    assert ckpt.strategy is not None and ckpt.strategy.name == "fedavgm"
    state = ckpt.strategy.state_numpy()
    assert sorted(state) == [f"momentum/{k}" for k in sorted(want)]
    for k, m in momentum.items():
        np.testing.assert_allclose(state[f"momentum/{k}"], m, rtol=1e-6, atol=1e-6)


async def test_secure_fedadam_steps_parameters_and_averages_batchnorm_statistics(
    tmp_path: Path,
) -> None:
    """Adam on the unmasked mean delta; a BatchNorm running statistic takes the plain mean."""
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    strategy = {"name": "fedadam", "server_lr": eta, "beta1": b1, "beta2": b2, "tau": tau}
    fed = make_fed(tmp_path, 4, secure=True, rounds=2, strategy=strategy)
    start = {**initial(), "bn.running_var": np.full((3,), 1.0, np.float32)}
    assert await run(fed, start) == 0
    target = mean_target(fed)
    w = {k: v.astype(np.float64) for k, v in start.items()}
    m = {k: np.zeros_like(v) for k, v in w.items()}
    v2 = {k: np.full_like(v, tau**2) for k, v in w.items()}
    for _ in range(2):
        for k in w:
            d = 0.5 * (target - w[k])
            if k == "bn.running_var":
                w[k] = w[k] + d
                continue
            m[k] = b1 * m[k] + (1 - b1) * d
            v2[k] = b2 * v2[k] + (1 - b2) * d * d
            w[k] = w[k] + eta * m[k] / (np.sqrt(v2[k]) + tau)
    ckpt = load_checkpoint(fed.director_cfg.state_dir)
    assert ckpt is not None and ckpt.round == 2
    # Up to the fixed-point quantisation of secure aggregation (steps of 2^-29).
    for k, got in ckpt.weights_numpy().items():
        np.testing.assert_allclose(got, w[k], rtol=0, atol=1e-5)
    # The running variance moved 3/4 of the way to the target in two rounds, like FedAvg.
    np.testing.assert_allclose(
        ckpt.weights_numpy()["bn.running_var"], target + (1.0 - target) * 0.25, atol=1e-5
    )
    assert not any("bn.running_var" in k for k in ckpt.strategy.state_numpy())


async def test_resume_continues_the_momentum_exactly(tmp_path: Path) -> None:
    straight = make_fed(tmp_path / "straight", 3, secure=False, rounds=2, strategy=FEDAVGM)
    assert await run(straight) == 0
    want = load_checkpoint(straight.director_cfg.state_dir)

    stopped = make_fed(tmp_path / "stopped", 3, secure=False, rounds=1, strategy=FEDAVGM)
    assert await run(stopped) == 0
    # Another optimiser cannot continue fedavgm's momentum: refused, naming both.
    other = msgspec.structs.replace(stopped.director_cfg.strategy, name="fedadam")
    stopped.director_cfg = msgspec.structs.replace(stopped.director_cfg, rounds=2, strategy=other)
    with pytest.raises(DirectorError, match=r"'fedavgm'.*'fedadam'"):
        await run(stopped, resume=True)
    stopped.director_cfg = msgspec.structs.replace(
        stopped.director_cfg, strategy=straight.director_cfg.strategy
    )
    assert await run(stopped, resume=True) == 0
    got = load_checkpoint(stopped.director_cfg.state_dir)
    assert got.round == want.round == 2
    assert [r["round"] for r in stopped.records()] == [1, 2]
    # Bit for bit: the momentum came back from the checkpoint as it was in memory.
    for k, v in want.weights_numpy().items():
        np.testing.assert_array_equal(got.weights_numpy()[k], v)
    assert got.strategy == want.strategy


async def test_prox_mu_reaches_every_trainer(tmp_path: Path) -> None:
    fed = make_fed(tmp_path, 3, secure=False, rounds=1, train={"prox_mu": 0.05})
    plans: list[TrainPlan] = []
    for trainer in fed.trainers.values():
        train = trainer.train

        def recording(weights: Any, plan: TrainPlan, *, seed: int, _train: Any = train) -> Any:
            plans.append(plan)
            return _train(weights, plan, seed=seed)

        trainer.train = recording  # type: ignore[method-assign]
    assert await run(fed) == 0
    assert [p.prox_mu for p in plans] == [0.05] * 3
    # The default plan asks for no proximal term.
    assert make_fed(tmp_path / "d", 2).director_cfg.train.prox_mu == 0.0


def test_the_bundled_trainer_hands_prox_mu_to_train_local(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from node.config import ModelConfig
    from node.trainer import TorchTrainer, TrainerContext
    from node.training import train as training
    from node.training.batches import ArrayDataset

    seen: list[float] = []
    real = training.train_local

    def spy(*args: Any, prox_mu: float = 0.0, **kw: Any) -> Any:
        seen.append(prox_mu)
        return real(*args, prox_mu=prox_mu, **kw)

    monkeypatch.setattr(training, "train_local", spy)
    images = np.random.default_rng(0).integers(0, 256, (8, 28, 28), dtype=np.uint8)
    data = ArrayDataset(images, np.arange(8) % 2)
    model = ModelConfig(arch="cnn", defense="none", width=4, norm="group")
    trainer = TorchTrainer(TrainerContext(model, data, data, torch.device("cpu")))
    weights = trainer.context.get_weights(trainer.model)
    plan = TrainPlan(local_epochs=1, batch_size=8, lr=0.05, augment=False, prox_mu=0.5)
    trainer.train(weights, plan, seed=1)
    trainer.train(weights, msgspec.structs.replace(plan, prox_mu=0.0), seed=1)
    assert seen == [0.5, 0.0]
