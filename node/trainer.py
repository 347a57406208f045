"""How an envoy trains and evaluates: the `Trainer` protocol, its context, the bundled trainer.

The envoy's round code (node.envoy) only sees a `Trainer`:

* ``train(weights, plan, *, seed) -> (new_weights, num_samples, mean_loss)``: start from the
  global weights, train on this envoy's data as the round's `TrainPlan` says (local_epochs,
  batch_size, lr, momentum, weight_decay, kl_beta, augment), return the new weights (same
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
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from node.config import EnvoyConfig, ModelConfig
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

    def train(
        self, weights: Mapping[str, np.ndarray], plan: TrainPlan, *, seed: int
    ) -> tuple[dict[str, np.ndarray], int, float]:
        from node.training.train import train_local

        ctx = self.context
        ctx.set_weights(self.model, weights)
        res = train_local(self.model, ctx.train_data, None, plan, seed=seed, workers=ctx.workers)
        return ctx.get_weights(self.model), int(res.num_samples), float(res.loss)

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


def make_trainer(
    cfg: EnvoyConfig, *, data: LocalData | None = None
) -> tuple[Trainer, ModelSummary]:
    """The envoy's trainer as its config says, and the summary of the model it trains.

    Loads the data (unless given), resolves the device, builds the configured model once to
    check it against the data and `[model]`, and constructs the trainer. Every problem is a
    FedbusError with exit code CONFIG naming the field (EntryPointError, DataMismatch,
    DeviceUnavailable), before the envoy joins the federation.
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
