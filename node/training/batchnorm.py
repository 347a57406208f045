"""Batch-norm statistics recomputed for a model, through secure aggregation.

A model whose weights are an average (of the last k global models, SWA-style, or of the
envoys' models, as FedAvg is) carries running means and variances that belong to none of
them: BatchNorm layers must be re-estimated on data before the model is evaluated (Izmailov
et al. 2018, `torch.optim.swa_utils.update_bn`). In a federation the data sits with the
envoys, so the estimate is split in two:

* envoy side, `batchnorm_moments`: one pass over the local training images (no
  augmentation, no gradients) with every BatchNorm layer normalising by its batch's
  statistics, as `update_bn` does, so that each layer's input does not depend on the
  running statistics being estimated and one pass serves every layer. The bottleneck runs
  as at evaluation (its mean, no noise) and dropout is off, because evaluation is what the
  statistics are for. For every layer and channel it returns the mean and mean square of
  the layer's input, standardised by the model's current running statistics
  (m = E[(x - mu) / s], q = E[((x - mu) / s)^2], s = sqrt(var + eps)), a vector of
  2 x (BatchNorm channels) numbers with values near 0 and 1 whatever the layer's scale,
  so that they quantise well under the update's clip range.
* the envoys' vectors travel through the federation's weighted secure aggregation like
  an update, with the image count as the weight (every image contributes the same number
  of positions to every layer), so the director learns only the pooled moments over all
  survivors' images: per-channel first and second moments of features, less than the
  running statistics each envoy already ships inside its FedAvg update.
* director side, `running_stats_from_moments`: pooled m and q back into running_mean and
  running_var (var = s^2 (q - m^2), the pooled population variance across every image
  and position) and into the global weights.

Pooling the second moment gives the variance of the layer's input over the whole data,
the quantity an evaluation-mode BatchNorm should divide by. (update_bn instead averages
per-batch variances, which leaves out the spread of the batch means; the difference is
the between-batch variance, small for batches of hundreds.)
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from node.training.train import images_to_tensor

# |m| and q are O(1) when the reference statistics are roughly right (an averaged model's
# are); the encoder multiplies by w = n / SAMPLE_CAP <= 1 before clipping, so any clip
# above the largest plausible q keeps them exact. Documented for the secure pass.
MOMENTS_CLIP = 64.0

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class BatchNormLayout:
    """The BatchNorm layers of a model, in module order, and where they sit in the vector."""

    names: tuple[str, ...]
    channels: tuple[int, ...]
    eps: tuple[float, ...]

    @classmethod
    def of(cls, model: nn.Module) -> BatchNormLayout:
        layers = [
            (name, m)
            for name, m in model.named_modules()
            if isinstance(m, _BATCHNORMS) and m.track_running_stats
        ]
        return cls(
            tuple(n for n, _ in layers),
            tuple(int(m.num_features) for _, m in layers),
            tuple(float(m.eps) for _, m in layers),
        )

    @property
    def size(self) -> int:
        """Length of the moments vector: a mean and a mean square per channel."""
        return 2 * sum(self.channels)

    def split(self, vector: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Moments vector -> {layer: (m, q)}."""
        vector = np.asarray(vector, np.float64).reshape(-1)
        if vector.size != self.size:
            raise ValueError(f"moments vector has {vector.size} entries, layout needs {self.size}")
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        offset = 0
        for name, c in zip(self.names, self.channels, strict=True):
            out[name] = (vector[offset : offset + c], vector[offset + c : offset + 2 * c])
            offset += 2 * c
        return out


def _reference(
    weights: Mapping[str, np.ndarray], name: str, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    try:
        mean = np.asarray(weights[f"{name}.running_mean"], np.float64)
        var = np.asarray(weights[f"{name}.running_var"], np.float64)
    except KeyError as exc:
        raise ValueError(f"weights lack the running statistics of {name}: {exc}") from None
    if (var < 0).any() or not (np.isfinite(mean).all() and np.isfinite(var).all()):
        raise ValueError(f"running statistics of {name} are not finite and non-negative")
    return mean, np.sqrt(var + eps)


@torch.no_grad()
def batchnorm_moments(
    model: nn.Module, images: np.ndarray | Tensor, *, batch_size: int = 256
) -> tuple[np.ndarray, int]:
    """Envoy side: (standardised moments vector, number of images) over `images`.

    `model` holds the global weights (its running statistics are the reference the moments
    are standardised by) and is left untouched: the pass runs on a copy.
    """
    layout = BatchNormLayout.of(model)
    if not layout.names:
        raise ValueError("the model has no BatchNorm layer with running statistics")
    x_all = images_to_tensor(images)
    n = int(x_all.shape[0])
    if n == 0:
        raise ValueError("no images to estimate batch-norm statistics on")
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (batch statistics), got {batch_size}")
    work = copy.deepcopy(model)
    work.eval()
    modules = dict(work.named_modules())
    state = {k: v.detach().cpu().numpy() for k, v in work.state_dict().items()}
    # Per layer: sum of z, sum of z^2 per channel, and the number of positions summed.
    sums: dict[str, list[Tensor]] = {}
    hooks = []
    for name, eps in zip(layout.names, layout.eps, strict=True):
        bn = modules[name]
        bn.train()  # normalise by the batch, as in training
        bn.momentum = 0.0  # and leave the copy's running statistics where they are
        mean, scale = _reference(state, name, eps)
        ref_mean = torch.as_tensor(mean)
        ref_scale = torch.as_tensor(scale)
        acc = [
            torch.zeros(len(mean), dtype=torch.float64),
            torch.zeros(len(mean), dtype=torch.float64),
            torch.zeros((), dtype=torch.float64),
        ]
        sums[name] = acc

        def hook(
            _m: nn.Module, args: tuple[Tensor, ...], acc=acc, mu=ref_mean, s=ref_scale
        ) -> None:
            x = args[0].detach().double().transpose(0, 1).reshape(args[0].shape[1], -1)
            z = (x - mu[:, None]) / s[:, None]
            acc[0] += z.sum(dim=1)
            acc[1] += z.square().sum(dim=1)
            acc[2] += z.shape[1]

        hooks.append(bn.register_forward_pre_hook(hook))
    try:
        # A final batch of one has no batch statistics: fold it into the previous batch.
        starts = list(range(0, n, batch_size))
        if len(starts) > 1 and n - starts[-1] == 1:
            starts.pop()
        for i, start in enumerate(starts):
            stop = starts[i + 1] if i + 1 < len(starts) else n
            if stop - start < 2:
                raise ValueError("batch-norm statistics need at least 2 images")
            work(x_all[start:stop])
    finally:
        for h in hooks:
            h.remove()
    parts = []
    for name in layout.names:
        total, total_sq, positions = sums[name]
        if float(positions) == 0:
            raise ValueError(f"batch-norm layer {name} was not reached by the forward pass")
        parts += [(total / positions).numpy(), (total_sq / positions).numpy()]
    return np.concatenate(parts), n


def running_stats_from_moments(
    weights: Mapping[str, np.ndarray], layout: BatchNormLayout, pooled: np.ndarray
) -> dict[str, np.ndarray]:
    """Director side: `weights` with every running_mean / running_var replaced.

    `pooled` is the image-weighted mean of the envoys' `batchnorm_moments` vectors (what
    the secure aggregation of those vectors yields); `weights` must hold the same
    reference statistics the envoys standardised by (the model they were sent).
    """
    out = {k: np.array(v, copy=True) for k, v in weights.items()}
    for (name, (m, q)), eps in zip(layout.split(pooled).items(), layout.eps, strict=True):
        mean, scale = _reference(weights, name, eps)
        var = scale**2 * np.maximum(q - m**2, 0.0)
        out[f"{name}.running_mean"] = (mean + scale * m).astype(np.float32)
        out[f"{name}.running_var"] = var.astype(np.float32)
    return out
