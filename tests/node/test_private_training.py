"""[train.privacy] wired through an envoy: the config refuses what would void the guarantee,
the bundled trainer trains with DP-SGD and keeps its privacy ledger across restarts, a
budget stops training, the demo's report.json carries each envoy's epsilon, and the
bottleneck's SNR is logged every round."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
import torch

from node.config import EnvoyConfig, ModelConfig, PrivacySettings, parse_config
from node.demo.launcher import Federation, Options
from node.demo.report import privacy_report
from node.entrypoints import EntryPointError
from node.trainer import TorchTrainer, TrainerContext
from node.training.batches import ArrayDataset
from node.training.privacy import (
    LEDGER_NAME,
    DPConfig,
    PrivacyAccountant,
    PrivacyBudgetExhausted,
    PrivacyError,
    PrivacyLedger,
    PrivacySpend,
)
from node.training.weights import get_weights
from protocol.configfile import ConfigError
from protocol.messages import TrainPlan
from tests.node.test_config import ENVOY

PLAN = TrainPlan(local_epochs=1, batch_size=16, lr=0.05, momentum=0.9, augment=False)
GROUP = ModelConfig(arch="cnn", defense="cvb", width=8, norm="group", image_size=28)


def envoy(**extra: Any) -> dict[str, Any]:
    return {**ENVOY, **extra}


@pytest.mark.parametrize(
    ("data", "match"),
    [
        # batch norm (the bundled default included) voids record-level DP
        (envoy(train={"privacy": {"noise_multiplier": 1.0}}), "model.norm"),
        (
            envoy(model={"norm": "batch"}, train={"privacy": {"noise_multiplier": 1.0}}),
            "model.norm",
        ),
        # no noise is no privacy; a negative sigma is nonsense
        (envoy(model={"norm": "group"}, train={"privacy": {"noise_multiplier": 0}}), "noise"),
        # the distributed share weakens one update's protection: only with an explicit count
        (
            envoy(
                model={"norm": "group"},
                train={"privacy": {"noise_multiplier": 1.0, "mode": "distributed"}},
            ),
            "honest_envoys",
        ),
        (
            envoy(
                model={"norm": "group"},
                train={"privacy": {"noise_multiplier": 1.0, "honest_envoys": 3}},
            ),
            "distributed",
        ),
        (
            envoy(
                model={"norm": "group"}, train={"privacy": {"noise_multiplier": 1.0, "delta": 0.5}}
            ),
            "delta",
        ),
        (
            envoy(
                model={"norm": "group"},
                train={"privacy": {"noise_multiplier": 1.0}, "trainer": "pkg.mod:Trainer"},
            ),
            "custom train.trainer",
        ),
    ],
)
def test_privacy_settings_that_would_void_the_guarantee_are_refused(
    tmp_path: Path, data: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        parse_config(data, EnvoyConfig, source="envoy.toml", base=tmp_path)
    assert "envoy.toml" in str(info.value)


def _envoy_config(tmp_path: Path) -> EnvoyConfig:
    data = envoy(
        model={"norm": "group"},
        train={"privacy": {"noise_multiplier": 1.1, "mode": "distributed", "honest_envoys": 3}},
    )
    return parse_config(data, EnvoyConfig, source="envoy.toml", base=tmp_path)


def test_valid_privacy_settings_load(tmp_path: Path) -> None:
    cfg = _envoy_config(tmp_path)
    assert cfg.train.privacy == PrivacySettings(
        noise_multiplier=1.1, mode="distributed", honest_envoys=3
    )


def context(tmp_path: Path, settings: PrivacySettings | None, n: int = 32) -> TrainerContext:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n) % 2
    return TrainerContext(
        model_config=GROUP,
        train_data=ArrayDataset(images, labels),
        val_data=ArrayDataset(images[:8], labels[:8]),
        device=torch.device("cpu"),
        privacy=settings,
        state_dir=tmp_path,
    )


def test_the_envoy_trains_with_dp_and_keeps_its_ledger_across_restarts(tmp_path: Path) -> None:
    settings = PrivacySettings(noise_multiplier=1.0, sample_rate=0.5)
    trainer = TorchTrainer(context(tmp_path, settings))
    start = get_weights(trainer.model)
    for r in (1, 2):
        with structlog.contextvars.bound_contextvars(round=r):  # as the envoy binds it
            new, samples, loss = trainer.train(start, PLAN, seed=r)
        # neither the record count nor a loss over the records leaves the envoy
        assert samples == 1 and math.isnan(loss)
        assert any(not np.array_equal(new[k], start[k]) for k in start)
    ledger = json.loads((tmp_path / LEDGER_NAME).read_text())
    assert [e["round"] for e in ledger["rounds"]] == [1, 2]
    # local mode, 1 epoch at q = 0.5: 2 steps a round; the accountant composes all 4
    assert [e["total_steps"] for e in ledger["rounds"]] == [2, 4]
    expected = PrivacyAccountant("rdp", [(1.0, 0.5, 4)]).epsilon(1e-5)
    assert ledger["epsilon"] == pytest.approx(expected)
    assert ledger["rounds"][0]["epsilon"] < ledger["rounds"][1]["epsilon"]
    # a restarted envoy goes on from the ledger, not from zero
    again = TorchTrainer(context(tmp_path, settings))
    with structlog.contextvars.bound_contextvars(round=3):
        again.train(start, PLAN, seed=3)
    ledger = json.loads((tmp_path / LEDGER_NAME).read_text())
    assert ledger["rounds"][-1]["total_steps"] == 6
    assert ledger["epsilon"] == pytest.approx(
        PrivacyAccountant("rdp", [(1.0, 0.5, 6)]).epsilon(1e-5)
    )


def test_the_dp_noise_is_fresh_each_round_not_derived_from_the_seed(tmp_path: Path) -> None:
    settings = PrivacySettings(noise_multiplier=1.0, sample_rate=1.0, sample_weight=500)
    trainer = TorchTrainer(context(tmp_path, settings))
    start = get_weights(trainer.model)
    first, samples, _ = trainer.train(start, PLAN, seed=7)
    assert samples == 500  # the configured public weight, not the 32 records
    second, _, _ = trainer.train(start, PLAN, seed=7)  # same seed, same sample, same data
    assert any(not np.array_equal(first[k], second[k]) for k in first)


def test_a_budget_stops_training_before_it_is_exceeded(tmp_path: Path) -> None:
    one_round = PrivacyAccountant("rdp", [(1.0, 0.5, 2)]).epsilon(1e-5)
    settings = PrivacySettings(noise_multiplier=1.0, sample_rate=0.5, max_epsilon=one_round * 1.1)
    trainer = TorchTrainer(context(tmp_path, settings))
    start = get_weights(trainer.model)
    trainer.train(start, PLAN, seed=1)
    before = (tmp_path / LEDGER_NAME).read_bytes()
    with pytest.raises(PrivacyBudgetExhausted, match="max_epsilon"):
        trainer.train(start, PLAN, seed=2)
    assert (tmp_path / LEDGER_NAME).read_bytes() == before  # nothing spent, nothing recorded


def test_the_private_trainer_refuses_a_proximal_term_and_spends_nothing(tmp_path: Path) -> None:
    """Behind the envoy's own refusal: a plan with prox_mu never trains without it under DP."""
    trainer = TorchTrainer(context(tmp_path, PrivacySettings(noise_multiplier=1.0)))
    start = get_weights(trainer.model)
    prox = TrainPlan(local_epochs=1, batch_size=16, lr=0.05, augment=False, prox_mu=0.01)
    with pytest.raises(PrivacyError, match="prox_mu"):
        trainer.train(start, prox, seed=1)
    assert not (tmp_path / LEDGER_NAME).exists()
    assert all(np.array_equal(v, start[k]) for k, v in get_weights(trainer.model).items())


def test_an_unreadable_or_mismatched_ledger_is_refused(tmp_path: Path) -> None:
    settings = PrivacySettings(noise_multiplier=1.0)
    (tmp_path / LEDGER_NAME).write_text("{not json")
    with pytest.raises(PrivacyError, match="unreadable"):
        TorchTrainer(context(tmp_path, settings))
    trainer_dir = tmp_path / "other"
    trainer_dir.mkdir()
    TorchTrainer(context(trainer_dir, settings)).privacy.ledger.record(  # type: ignore[union-attr]
        PrivacySpend(1.0, 0.5, 2, 1.0), round=1
    )
    with pytest.raises(PrivacyError, match="accountant"):
        TorchTrainer(context(trainer_dir, PrivacySettings(noise_multiplier=1.0, accountant="prv")))


def test_the_trainer_refuses_batch_norm_and_streamed_records(tmp_path: Path) -> None:
    ctx = context(tmp_path, PrivacySettings(noise_multiplier=1.0))
    bn = TrainerContext(**{**ctx.__dict__, "model_config": ModelConfig(norm="batch", width=8)})
    with pytest.raises(PrivacyError, match="batch norm"):
        TorchTrainer(bn)
    streamed = TrainerContext(**{**ctx.__dict__, "train_data": _Streamed()})
    with pytest.raises(EntryPointError, match="in memory"):
        TorchTrainer(streamed)


class _Streamed(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.zeros(1, 28, 28), i % 2


def test_the_bottleneck_snr_is_logged_every_round(tmp_path: Path) -> None:
    trainer = TorchTrainer(context(tmp_path, None))
    start = get_weights(trainer.model)
    with structlog.testing.capture_logs() as logs:
        trainer.train(start, PLAN, seed=1)
    snr = [e for e in logs if e["event"] == "bottleneck_snr"]
    assert len(snr) == 1 and math.isfinite(snr[0]["snr_db"])


def test_the_demo_report_carries_each_dp_envoys_epsilon(tmp_path: Path) -> None:
    fed = Federation(Options(envoys=3, out=str(tmp_path / "run")))
    assert privacy_report(fed) is None  # no DP envoy: no privacy section
    for name, sigma in (("envoy-1", 1.0), ("envoy-3", 0.8)):
        # what an envoy's PrivateTraining keeps in its state folder
        ledger = PrivacyLedger(DPConfig(sigma), fed.envoy_state(name) / LEDGER_NAME)
        for r in (1, 2):
            ledger.record(PrivacySpend(sigma, 1 / 3, 3, sigma), round=r)
    report = privacy_report(fed)
    assert report is not None and set(report["envoys"]) == {"envoy-1", "envoy-3"}
    eps = {n: e["epsilon"] for n, e in report["envoys"].items()}
    assert eps["envoy-3"] > eps["envoy-1"] > 0  # less noise, more spent
    assert report["max_epsilon"] == eps["envoy-3"] and report["delta"] == 1e-5
    assert [r["round"] for r in report["envoys"]["envoy-1"]["rounds"]] == [1, 2]
    json.dumps(report, allow_nan=False)  # report.json stays strict JSON


async def test_a_distributed_dp_envoy_refuses_a_plain_round(tmp_path: Path) -> None:
    import asyncio

    import msgspec

    from node.config import EnvoyTraining
    from tests.node.nodeharness import make_fed

    fed = make_fed(tmp_path, 3, secure=False, rounds=1)
    share = PrivacySettings(noise_multiplier=1.0, mode="distributed", honest_envoys=2)
    cfg = fed.envoy_cfgs["envoy-1"]
    fed.envoy_cfgs["envoy-1"] = msgspec.structs.replace(
        cfg, train=EnvoyTraining(privacy=share), model=GROUP
    )
    for name in fed.envoy_cfgs:
        fed.start_envoy(name)
    with structlog.testing.capture_logs() as logs:
        rc = await asyncio.wait_for(fed.director().run(), 120)
    await fed.stop()
    assert rc == 0
    record = fed.records()[0]
    assert record["secure"] is False and "envoy-1" not in record["survivors"]
    assert fed.trainers["envoy-1"].calls == 0  # its update was never even computed
    assert any(e["event"] == "training_refused" for e in logs)
