"""Local training and scoring: what an envoy does with the global model each round.

`train_local` runs `plan.local_epochs` epochs of minibatch SGD (or Adam) on the envoy's
images, minimising cross-entropy + `plan.kl_beta` * the bottleneck's KL (bits). It is a
pure function of (model, data, plan, seed): shuffling, augmentation and the bottleneck's
noise all draw from RNGs seeded here, and the global torch RNG is restored afterwards.

Augmentation is done on whole batches of tensors with one `affine_grid`/`grid_sample`
call (small rotation, scale and shift; optional horizontal flip) plus a brightness /
contrast jitter: cheap on one CPU core, and mild, because a chest X-ray is only ever
taken upright and centred.

Class weighting ("balanced", the default) weights each class by N / (2 N_c) on the
envoy's own labels. Under label skew every envoy then optimises a balanced objective, so
the averaged model does not inherit each hospital's class prior. (PyTorch normalises a
weighted mean by the batch's weight sum, so a rare class's large weight never scales a
step beyond the clipping below.) Its effect on test accuracy was not measured apart from
the rest of the recipe.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from node.training.batches import batch_source, images_to_tensor, loader_context
from node.training.metrics import DEFAULT_BINS, score_histograms
from protocol.messages import TrainPlan

Progress = Callable[[int, int, float], None]  # (steps done, total steps, running loss)
CLASS_WEIGHTING = ("balanced", "none")


@dataclass(frozen=True)
class TrainResult:
    num_samples: int
    loss: float  # mean training loss (cross-entropy + weighted KL) over the last epoch
    steps: int = 0
    seconds: float = 0.0
    kl_bits: float = 0.0  # mean bottleneck KL over the last epoch (0 without a bottleneck)


@dataclass(frozen=True)
class EvalResult:
    num_samples: int
    loss_sum: float
    hist_negative: list[int]
    hist_positive: list[int]


def augment_batch(
    x: Tensor,
    size: int,
    generator: torch.Generator,
    *,
    max_rotate_deg: float = 10.0,
    max_scale: float = 0.10,
    max_shift: float = 0.08,
    flip: bool = True,
    jitter: float = 0.10,
) -> Tensor:
    """Random affine (+ flip) and brightness/contrast jitter, output `size` x `size`."""
    n = x.shape[0]

    def uniform(lo: float, hi: float) -> Tensor:
        return torch.rand(n, generator=generator) * (hi - lo) + lo

    angle = uniform(-max_rotate_deg, max_rotate_deg) * (math.pi / 180)
    scale = uniform(1 - max_scale, 1 + max_scale)
    sx = scale.clone()
    if flip:
        sx = sx * torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Output -> input sampling grid: rotate, then scale (x scale carries the flip), shift.
    theta = torch.stack(
        [
            torch.stack([cos / sx, -sin / scale, uniform(-max_shift, max_shift) * 2], 1),
            torch.stack([sin / sx, cos / scale, uniform(-max_shift, max_shift) * 2], 1),
        ],
        1,
    ).to(x.device)  # drawn on the CPU generator, so a GPU run draws the same augmentation
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if jitter > 0:
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        contrast = uniform(1 - jitter, 1 + jitter).view(n, 1, 1, 1).to(x.device)
        bright = uniform(-jitter, jitter).view(n, 1, 1, 1).to(x.device) * 0.5
        out = ((out - mean) * contrast + mean + bright).clamp_(0.0, 1.0)
    return out


def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> Tensor | None:
    if mode == "none":
        return None
    if mode != "balanced":
        raise ValueError(f"class_weighting must be one of {CLASS_WEIGHTING}, got {mode!r}")
    counts = np.bincount(np.asarray(labels, np.int64), minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.as_tensor(weights, dtype=torch.float32)


def make_optimizer(model: nn.Module, plan: TrainPlan) -> torch.optim.Optimizer:
    kind = getattr(plan, "optimizer", "sgd")
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=plan.lr, weight_decay=plan.weight_decay)
    if kind != "sgd":
        raise ValueError(f"plan.optimizer must be 'sgd' or 'adam', got {kind!r}")
    return torch.optim.SGD(
        model.parameters(),
        lr=plan.lr,
        momentum=plan.momentum,
        weight_decay=plan.weight_decay,
        nesterov=plan.momentum > 0,
    )


def train_local(
    model: nn.Module,
    images: np.ndarray | Tensor | Dataset,
    labels: np.ndarray | None,
    plan: TrainPlan,
    *,
    seed: int,
    progress: Progress | None = None,
    class_weighting: str = "balanced",
    flip: bool = True,
    max_grad_norm: float | None = 5.0,
    augment_strength: float = 1.0,
    label_smoothing: float = 0.0,
    prox_mu: float = 0.0,
    device: torch.device | str | None = None,
    workers: int = 0,
) -> TrainResult:
    """Train `model` in place on (images, labels) as `plan` says; return sample count and loss.

    `max_grad_norm` clips the global gradient norm of each step. Under label skew an envoy
    with a handful of one class sees rare, heavily weighted, large gradients, and the
    bottleneck's mean can grow to outrun its noise; clipping keeps both from kicking the
    momentum SGD off a cliff without changing ordinary steps. `augment_strength` scales
    the rotation, scale, shift and jitter ranges of `augment_batch` together.
    `label_smoothing` is cross-entropy's. `prox_mu` > 0 adds FedProx's proximal term
    mu/2 ||w - w_global||^2 (Li et al. 2020), which keeps a skewed envoy's local steps near
    the global model; its gradient mu (w - w_global) is added before clipping. `device`
    moves the model there first (node.training.device.select_device); the images stay in
    host memory and travel one batch at a time. `images` may also be a torch Dataset
    (labels None): it is then read batch by batch, `workers` processes ahead, never held
    whole (node.training.batches).
    """
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if prox_mu < 0:
        raise ValueError(f"prox_mu must be >= 0, got {prox_mu}")
    if device is not None:
        model.to(device)
    dev = model_device(model)
    source = batch_source(images, labels, workers=workers)
    n = len(source)
    if n == 0:
        raise ValueError("no training samples")
    size = int(getattr(model, "image_size", 0) or source.image_size)
    num_classes = int(getattr(model, "num_classes", 2))
    weight = class_weights(source.labels, num_classes, class_weighting)
    if weight is not None:
        weight = weight.to(dev)
    kl_fn = getattr(model, "kl_loss", None)

    # A batch of one breaks BatchNorm in training mode; fold a lone last sample away.
    batch = min(plan.batch_size, n)
    steps_per_epoch = max(1, n // batch if n % batch == 1 else math.ceil(n / batch))
    total_steps = steps_per_epoch * plan.local_epochs

    started = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(model, plan)
    anchor = [p.detach().clone() for p in model.parameters()] if prox_mu > 0 else None
    model.train()
    step = 0
    epoch_loss = epoch_kl = 0.0
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed + 1)  # dropout and the bottleneck's noise
        for _ in range(plan.local_epochs):
            perm = torch.randperm(n, generator=gen)
            epoch_loss = epoch_kl = 0.0
            seen = 0
            for idx, x, y in source.batches(perm, batch, steps_per_epoch, dev):
                if plan.augment:
                    x = augment_batch(
                        x,
                        size,
                        gen,
                        max_rotate_deg=10.0 * augment_strength,
                        max_scale=0.10 * augment_strength,
                        max_shift=0.08 * augment_strength,
                        jitter=0.10 * augment_strength,
                        flip=flip,
                    )
                logits = model(x)
                loss = F.cross_entropy(logits, y, weight=weight, label_smoothing=label_smoothing)
                kl = kl_fn() if (kl_fn is not None) else torch.zeros((), device=dev)
                total = loss + plan.kl_beta * kl if plan.kl_beta > 0 else loss
                value = float(total.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(f"training diverged at step {step} (lr={plan.lr})")
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                if anchor is not None:
                    _add_proximal_gradient(model, anchor, prox_mu)
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()
                k = int(idx.shape[0])
                epoch_loss += value * k
                epoch_kl += float(kl.detach()) * k
                seen += k
                step += 1
                if progress is not None:
                    progress(step, total_steps, epoch_loss / seen)
            epoch_loss /= seen
            epoch_kl /= seen
    return TrainResult(
        num_samples=n,
        loss=epoch_loss,
        steps=step,
        seconds=time.perf_counter() - started,
        kl_bits=epoch_kl,
    )


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live (the CPU for a model without any)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def _add_proximal_gradient(model: nn.Module, anchor: list[Tensor], mu: float) -> None:
    for p, p0 in zip(model.parameters(), anchor, strict=True):
        if p.grad is not None:
            p.grad.add_(p.detach() - p0, alpha=mu)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: np.ndarray | Tensor,
    batch_size: int = 512,
    *,
    flip_tta: bool = False,
) -> Tensor:
    """Eval-mode logits on the CPU, computed batch by batch on the model's device.
    `flip_tta` averages them with those of the mirrored images (training augments with the
    same horizontal flip, so both views are in distribution).
    """
    was_training = model.training
    model.eval()
    dev = model_device(model)
    try:
        x_all = images_to_tensor(images)
        outs = []
        for i in range(0, x_all.shape[0], batch_size):
            x = x_all[i : i + batch_size].to(dev)
            out = model(x)
            if flip_tta:
                out = (out + model(x.flip(-1))) / 2
            outs.append(out.cpu())
        return torch.cat(outs) if outs else torch.zeros(0, 2)
    finally:
        model.train(was_training)


def predict_scores(
    model: nn.Module, images: np.ndarray | Tensor, batch_size: int = 512, *, flip_tta: bool = False
) -> np.ndarray:
    """P(pneumonia) per image, float64 in [0, 1], eval mode (bottleneck at its mean)."""
    logits = predict_logits(model, images, batch_size, flip_tta=flip_tta)
    return torch.softmax(logits.double(), dim=1)[:, 1].numpy()


@torch.no_grad()
def predict_dataset(
    model: nn.Module, dataset: Dataset, batch_size: int = 256, *, workers: int = 0
) -> tuple[Tensor, np.ndarray]:
    """Eval-mode logits (on the CPU) and labels of every item of `dataset`, in order, read
    batch by batch like training reads it (node.training.batches)."""
    was_training = model.training
    model.eval()
    dev = model_device(model)
    logits: list[Tensor] = []
    labels: list[np.ndarray] = []
    try:
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            multiprocessing_context=loader_context(workers),
            generator=torch.Generator().manual_seed(0),  # the global RNG is not its to draw
        )
        for x, y in loader:
            logits.append(model(images_to_tensor(x).to(dev)).cpu())
            labels.append(np.asarray(y, np.int64).reshape(-1))
    finally:
        model.train(was_training)
    num_classes = int(getattr(model, "num_classes", 2))
    if not logits:
        return torch.zeros(0, num_classes), np.zeros(0, np.int64)
    return torch.cat(logits), np.concatenate(labels)


def evaluate(
    model: nn.Module,
    images: np.ndarray | Tensor,
    labels: np.ndarray,
    bins: int = DEFAULT_BINS,
    *,
    flip_tta: bool = False,
) -> EvalResult:
    """What an envoy reports for federated validation: loss sum and per-class histograms."""
    labels = np.asarray(labels, np.int64).reshape(-1)
    logits = predict_logits(model, images, flip_tta=flip_tta)
    loss_sum = float(F.cross_entropy(logits, torch.as_tensor(labels), reduction="sum"))
    scores = torch.softmax(logits.double(), dim=1)[:, 1].numpy()
    neg, pos = score_histograms(scores, labels, bins)
    return EvalResult(labels.size, loss_sum, neg.tolist(), pos.tolist())


def round_lr(
    base_lr: float,
    round_index: int,
    total_rounds: int,
    *,
    schedule: str = "cosine",
    final_fraction: float = 0.05,
    hold_rounds: int = 0,
) -> float:
    """Learning rate the director sends for round `round_index` (0-based) of `total_rounds`.

    "cosine" decays from base_lr to final_fraction * base_lr over the rounds; "constant"
    keeps base_lr. Decaying across rounds is what lets FedAvg settle under label skew.
    `hold_rounds` > 0 ends the cosine that many rounds early and holds its final rate for
    the last `hold_rounds` rounds: the constant-rate tail whose models SWA averages.
    """
    if total_rounds < 1 or not 0 <= round_index < total_rounds:
        raise ValueError(f"round {round_index} out of range for {total_rounds} rounds")
    if not 0 <= hold_rounds < total_rounds:
        raise ValueError(f"hold_rounds must be in 0..{total_rounds - 1}, got {hold_rounds}")
    if schedule == "constant" or total_rounds == 1:
        return base_lr
    if schedule != "cosine":
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    decay_rounds = total_rounds - hold_rounds
    if decay_rounds == 1:
        return base_lr if round_index == 0 else base_lr * final_fraction
    progress = min(round_index, decay_rounds - 1) / (decay_rounds - 1)
    low = base_lr * final_fraction
    return low + (base_lr - low) * 0.5 * (1 + math.cos(math.pi * progress))
