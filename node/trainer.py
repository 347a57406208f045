"""How an envoy trains and evaluates: the `Trainer` protocol, its context, the bundled trainer.

The envoy's round code (node.envoy) only sees a `Trainer`:

* ``train(weights, plan, *, seed) -> (new_weights, num_samples, mean_loss)``: start from the
  global weights, train on this envoy's data as the round's `TrainPlan` says (local_epochs,
  batch_size, lr, momentum, weight_decay, kl_beta, augment, and prox_mu: FedProx's
  mu/2 ||w - w_global||^2 added to the loss, 0 = none), return the new weights (same
  names and shapes), how many samples they were trained on (the FedAvg weight) and the
  mean training loss. `seed` seeds everything random in the step;
* ``evaluate(weights) -> Predictions``: score this envoy's validation split with the given
  weights: class probabilities (N x num_classes) and labels. The envoy turns them into
  histograms (node.training.histograms) before anything leaves the node.

Both run in a worker thread, one call at a time. Weights are {name: float32 array} for every
floating entry of the model's state_dict (node.training.weights); `TrainerContext` converts.

A team plugs in its own trainer with ``[train] trainer = "package.module:Class"``: the envoy
builds ``Class(context)`` once, with the `TrainerContext` (the configured model factory,
this envoy's datasets, the device, ``[train.options]``). Without one, `TorchTrainer` runs the
bundled recipe (node.training.train: augmentation, class weighting, the bottleneck's KL term,
gradient clipping) on any model and any dataset.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from node.config import EnvoyConfig, ModelConfig, PrivacySettings
from node.entrypoints import EntryPointError, load_entry_point
from node.localdata import LocalData, check_local_data, load_local_data
from protocol.messages import ModelSummary, TrainPlan

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

__all__ = [
    "Predictions",
    "TorchTrainer",
    "Trainer",
    "TrainerContext",
    "make_trainer",
]


@dataclass(frozen=True)
class Predictions:
    """A model's validation scores: what `Trainer.evaluate` returns (never leaves the node)."""

    probabilities: np.ndarray  # N x num_classes, rows summing to 1 (softmax outputs)
    labels: np.ndarray  # N class indices
    loss_sum: float  # summed cross-entropy (the director reports loss_sum / N)


class Trainer(Protocol):
    """Local training and validation scoring (see the module docstring)."""

    def train(
        self, weights: Mapping[str, np.ndarray], plan: TrainPlan, *, seed: int
    ) -> tuple[dict[str, np.ndarray], int, float]:
        """(new weights, number of samples, mean training loss)."""
        ...

    def evaluate(self, weights: Mapping[str, np.ndarray]) -> Predictions:
        """Class probabilities and labels of the validation split."""
        ...


@dataclass(frozen=True)
class TrainerContext:
    """What a trainer gets from its envoy."""

    model_config: ModelConfig
    train_data: Dataset[Any]  # (image C x H x W float in [0, 1], class index) items
    val_data: Dataset[Any]
    device: torch.device
    options: Mapping[str, Any] = field(default_factory=dict)  # [train.options]
    workers: int = 0  # [train] workers: processes reading a streamed dataset ahead
    node_id: str = ""
    # [train.privacy]: the bundled trainer trains with DP-SGD and keeps its privacy ledger
    # in state_dir (node.training.privacy).
    privacy: PrivacySettings | None = None
    state_dir: Path | None = None

    def build_model(self) -> torch.nn.Module:
        """A new instance of the federation's model (the configured factory), on `device`."""
        from node.models import build_configured_model

        return build_configured_model(self.model_config).to(self.device)

    @staticmethod
    def set_weights(model: torch.nn.Module, weights: Mapping[str, np.ndarray]) -> None:
        """Load the federation's weights into `model` (exact names and shapes, or ValueError)."""
        from node.training.weights import set_weights

        set_weights(model, weights)

    @staticmethod
    def get_weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
        """The weights the federation averages, as float32 numpy copies."""
        from node.training.weights import get_weights

        return get_weights(model)


class TorchTrainer:
    """The bundled recipe (node.training.train) on the configured model and this envoy's data.

    One model instance lives on the device for the envoy's lifetime; each call loads the
    weights it is given. In-memory data (the bundled sources) is indexed as a tensor; any
    other dataset is streamed from disk batch by batch.
    """

    def __init__(self, context: TrainerContext) -> None:
        self.context = context
        self.model = context.build_model()
        self.privacy: PrivateTraining | None = None
        if context.privacy is not None:
            self.privacy = PrivateTraining(context, self.model)

    def train(
        self, weights: Mapping[str, np.ndarray], plan: TrainPlan, *, seed: int
    ) -> tuple[dict[str, np.ndarray], int, float]:
        from node.training.train import train_local

        ctx = self.context
        ctx.set_weights(self.model, weights)
        if self.privacy is not None:
            result = self.privacy.train(plan, seed=seed)
        else:
            res = train_local(
                self.model,
                ctx.train_data,
                None,
                plan,
                seed=seed,
                workers=ctx.workers,
                prox_mu=plan.prox_mu,
            )
            result = (ctx.get_weights(self.model), int(res.num_samples), float(res.loss))
        log_bottleneck_snr(self.model)
        return result

    def evaluate(self, weights: Mapping[str, np.ndarray]) -> Predictions:
        import torch
        import torch.nn.functional as F

        from node.training.batches import ArrayDataset
        from node.training.train import predict_dataset, predict_logits

        ctx = self.context
        ctx.set_weights(self.model, weights)
        val = ctx.val_data
        if isinstance(val, ArrayDataset):
            logits, labels = predict_logits(self.model, val.images), val.labels
        else:
            logits, labels = predict_dataset(self.model, val, workers=ctx.workers)
        target = torch.as_tensor(labels, dtype=torch.int64)
        loss_sum = float(F.cross_entropy(logits.double(), target, reduction="sum"))
        probabilities = torch.softmax(logits.double(), dim=1).numpy()
        return Predictions(probabilities, np.asarray(labels, np.int64), loss_sum)


def log_bottleneck_snr(model: torch.nn.Module) -> float:
    """Log (and return) the bottleneck's signal-to-noise ratio in dB over the round's last
    training batch: how much of the latent its noise still drowns. Training can erode it
    (a growing mean outruns a fixed noise), so it is watched every round; NaN (not logged)
    for a model without a bottleneck."""
    import math

    import structlog

    from gradient_leakage.bottleneck import bottleneck_snr_db

    snr = bottleneck_snr_db(model)
    if not math.isnan(snr):
        structlog.get_logger().info("bottleneck_snr", snr_db=round(snr, 3))
    return snr


class PrivateTraining:
    """The bundled recipe under record-level DP ([train.privacy]): DP-SGD through
    ``train_local(privacy=...)``, every round's spend composed in the envoy's privacy
    ledger (state_dir/privacy.json) and logged with its epsilon.

    The DP noise is drawn from a generator seeded from the OS CSPRNG each round
    (node.training.seeds.secret_seed): the guarantee needs it unpredictable to the director
    and to every other party, so it never derives from the envoy's configured seed, not
    even under `[policy] insecure_reproducible_seeds`. What leaves the envoy besides the
    noised weights is kept free of the records too: the sample count sent is the configured
    public `sample_weight`, not the record count, and the training loss sent is NaN (a loss
    over the private records is not covered by the noise).
    """

    def __init__(self, context: TrainerContext, model: torch.nn.Module) -> None:
        from node.training.batches import ArrayDataset
        from node.training.privacy import LEDGER_NAME, DPConfig, PrivacyLedger, check_model

        settings = context.privacy
        assert settings is not None
        if not isinstance(context.train_data, ArrayDataset):
            raise EntryPointError(
                "train.privacy needs the training records in memory (a bundled [data] "
                "source), not a streamed data set"
            )
        check_model(model)
        self.context, self.model, self.records = context, model, context.train_data
        weights = settings.class_weights
        self.dp = DPConfig(
            noise_multiplier=settings.noise_multiplier,
            max_grad_norm=settings.max_grad_norm,
            sample_rate=settings.sample_rate,
            delta=settings.delta,
            accountant=settings.accountant,
            mode=settings.mode,
            honest_envoys=settings.honest_envoys or 1,
            class_weights=tuple(weights) if weights is not None else None,
            physical_batch=settings.physical_batch,
        )
        self.sample_weight = settings.sample_weight
        path = context.state_dir / LEDGER_NAME if context.state_dir is not None else None
        self.ledger = PrivacyLedger(self.dp, path, max_epsilon=settings.max_epsilon)

    def train(self, plan: TrainPlan, *, seed: int) -> tuple[dict[str, np.ndarray], int, float]:
        import structlog
        import torch

        from node.training.seeds import secret_seed
        from node.training.train import model_device, train_local

        self.ledger.check(len(self.records), plan)
        device = model_device(self.model)
        noise = torch.Generator(device).manual_seed(secret_seed())
        res = train_local(
            self.model, self.records.images, self.records.labels, plan, seed=seed,
            privacy=self.dp, noise=noise, prox_mu=plan.prox_mu,
        )  # fmt: skip
        spend = getattr(res, "spend", None)
        assert spend is not None
        # The envoy binds the round it trains for (node.logs.set_round); the worker thread
        # it trains in runs in a copy of its context.
        round_ = structlog.contextvars.get_contextvars().get("round")
        entry = self.ledger.record(spend, round=round_)
        structlog.get_logger().info(
            "privacy_spent",
            epsilon=round(entry["epsilon"], 4),
            own_epsilon=round(entry["own_epsilon"], 4),
            delta=entry["delta"],
            accountant=entry["accountant"],
            mode=entry["mode"],
            steps=entry["steps"],
            clipped_fraction=round(getattr(res, "clipped_fraction", 0.0), 3),
        )
        return self.context.get_weights(self.model), self.sample_weight, float("nan")


def make_trainer(
    cfg: EnvoyConfig, *, data: LocalData | None = None
) -> tuple[Trainer, ModelSummary]:
    """The envoy's trainer as its config says, and the summary of the model it trains.

    Loads the data (unless given), resolves the device, builds the configured model once to
    check it against the data and `[model]`, and constructs the trainer. Every problem is a
    FedbusError with exit code CONFIG naming the field (EntryPointError, DataMismatch,
    DeviceUnavailable, PrivacyError), before the envoy joins the federation.
    """
    import torch

    from node.modelcheck import model_summary
    from node.models import build_configured_model, check_model
    from node.training.device import select_device
    from node.training.weights import get_weights

    torch.set_num_threads(cfg.threads)
    device = select_device(cfg.train.device)
    local = data if data is not None else load_local_data(cfg)
    check_local_data(local, cfg.model)
    probe = build_configured_model(cfg.model)
    check_model(probe, cfg.model)
    if cfg.train.privacy is not None:
        from node.training.privacy import check_model as check_private

        check_private(probe)  # a factory's model: batch norm is refused here (PrivacyError)
    summary = model_summary(cfg.model, get_weights(probe))
    del probe
    context = TrainerContext(
        model_config=cfg.model,
        train_data=local.train,
        val_data=local.val,
        device=device,
        options=dict(cfg.train.options),
        workers=cfg.train.workers,
        node_id=cfg.node_id,
        privacy=cfg.train.privacy,
        state_dir=Path(cfg.state_dir),
    )
    if cfg.train.trainer is None:
        if cfg.train.options:
            raise EntryPointError(
                "train.options are for a custom train.trainer; the bundled trainer takes none"
            )
        return TorchTrainer(context), summary
    cls: Callable[[TrainerContext], Any] = load_entry_point(
        cfg.train.trainer, field="train.trainer"
    )
    try:
        trainer = cls(context)
    except Exception as exc:  # the team's constructor failed: say which and how
        raise EntryPointError(
            f"train.trainer = {cfg.train.trainer!r}: {getattr(cls, '__name__', cls)}(context) "
            f"raised {type(exc).__name__}: {exc}"
        ) from exc
    missing = [m for m in ("train", "evaluate") if not callable(getattr(trainer, m, None))]
    if missing:
        raise EntryPointError(
            f"train.trainer = {cfg.train.trainer!r} has no {' or '.join(missing)} method; a "
            f"trainer implements train(weights, plan, *, seed) and evaluate(weights) "
            f"(node.trainer.Trainer)"
        )
    return trainer, summary
