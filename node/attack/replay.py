"""The envoy's local training, replayed as a function differentiable in the images.

An attacker who wants to invert a real update has to simulate what produced it: not one
gradient, nor plain SGD, but :func:`node.training.train.train_local` with the envoy's recipe
(Nesterov momentum, weight decay, class-balanced cross-entropy, the KL term, global
gradient-norm clipping, batch norm in training mode and the running statistics it moves).
:func:`replay` is that function, written functionally so autograd can differentiate the
update with respect to the images fed; ``tests/gradient_leakage/test_envoy_replay.py`` keeps
it equal to ``train_local`` (same seed, same draws) to float tolerance, so a change to the
recipe that the replay does not follow fails there.

What the replay takes as its unknowns are the images *as fed* (after augmentation), one per
fed slot, in the order the envoy fed them: which slot an image lands in is a permutation the
attacker's free dummies absorb, and an augmented X-ray is as good a target as the original
(identification registers it, see ``gradient_leakage.metrics``). So the attacker needs
neither the shuffle nor the augmentation draws, the secrets it cannot have; only the
bottleneck's noise stays out of its reach (and the oracle of ``node.attack`` is handed it).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from gradient_leakage.bottleneck import Bottleneck, NoiseSource, noise_from
from node.training.batches import images_to_tensor
from node.training.privacy import DPConfig
from node.training.train import TrainResult, augment_batch, class_weights, train_local
from protocol.messages import TrainPlan

Params = dict[str, Tensor]


def _train_local_default(name: str) -> Any:
    return inspect.signature(train_local).parameters[name].default


@dataclass(frozen=True)
class EnvoyRecipe:
    """Everything ``train_local`` is called with besides the model, the data and the seed.

    :meth:`deployed` takes the levers the envoy leaves at ``train_local``'s defaults from
    ``train_local``'s own signature, so the attack follows the envoy when they change.
    """

    plan: TrainPlan
    class_weighting: str = "balanced"
    flip: bool = True
    max_grad_norm: float | None = 5.0
    augment_strength: float = 1.0
    # DP-SGD (node.training.privacy): per-record clipping and noise instead of the class
    # weights and the global clip. Replayed with every record in every step (sample rate 1),
    # the one DP setting in which the attacker knows which records each step used.
    privacy: DPConfig | None = None

    @classmethod
    def deployed(cls, plan: TrainPlan, privacy: DPConfig | None = None) -> EnvoyRecipe:
        return cls(
            plan=plan,
            class_weighting=_train_local_default("class_weighting"),
            flip=_train_local_default("flip"),
            max_grad_norm=_train_local_default("max_grad_norm"),
            augment_strength=_train_local_default("augment_strength"),
            privacy=privacy,
        )

    def __post_init__(self) -> None:
        if getattr(self.plan, "optimizer", "sgd") != "sgd":
            raise ValueError("the replay follows train_local's SGD only")
        if self.privacy is not None and self.privacy.sample_rate != 1.0:
            raise ValueError(
                "a DP update is replayed with sample rate 1 only (which records a Poisson "
                "sample drew is one more secret)"
            )

    def train(
        self, model: nn.Module, images: np.ndarray | Tensor, labels: np.ndarray, seed: int
    ) -> TrainResult:
        """The envoy's own ``train_local`` with this recipe (the victim's side)."""
        return train_local(
            model,
            images,
            labels,
            self.plan,
            seed=seed,
            class_weighting=self.class_weighting,
            flip=self.flip,
            max_grad_norm=self.max_grad_norm,
            augment_strength=self.augment_strength,
            privacy=self.privacy,
        )

    def schedule(self, n: int) -> list[int]:
        """Batch sizes of every step of one ``train_local`` call on ``n`` images (all
        epochs), exactly as it cuts them (a lone last sample is folded away)."""
        if n < 1:
            raise ValueError("no training samples")
        if self.privacy is not None:
            return [n] * self.privacy.steps_per_round(n, self.plan)
        batch = min(self.plan.batch_size, n)
        steps = max(1, n // batch if n % batch == 1 else math.ceil(n / batch))
        sizes = [batch] * (steps - 1) + [n - batch * (steps - 1)]
        return sizes * self.plan.local_epochs


@dataclass(frozen=True)
class FedBatches:
    """The images an envoy fed, slot by slot, as ``train_local`` drew them."""

    images: Tensor  # (slots, C, H, W) float in [0, 1], augmented, in feeding order
    labels: Tensor  # (slots,) int64
    index: Tensor  # (slots,) position of each slot's image in the envoy's data
    sizes: tuple[int, ...]  # batch size of each step


def fed_batches(
    model: nn.Module,
    images: np.ndarray | Tensor,
    labels: np.ndarray,
    recipe: EnvoyRecipe,
    seed: int,
) -> FedBatches:
    """Draw the shuffles and augmentations ``train_local(seed=seed)`` draws, without training.

    The victim's side uses it to score reconstructions against what the envoy really fed;
    only an evaluator (or the noise oracle's sanity test) can call it, since it needs the seed.
    """
    x_all = images_to_tensor(images)
    y_all = torch.as_tensor(np.asarray(labels, np.int64).reshape(-1))
    n = int(y_all.shape[0])
    size = int(getattr(model, "image_size", x_all.shape[-1]))
    sizes = recipe.schedule(n)
    s = recipe.augment_strength
    gen = torch.Generator().manual_seed(seed)
    xs, idxs = [], []
    if recipe.privacy is not None:  # train_local_dp: a Poisson mask per step (rate 1: all)
        for _ in sizes:
            idx = torch.nonzero(torch.rand(n, generator=gen) < 1.0).flatten()
            x = x_all[idx]
            if recipe.plan.augment:
                x = augment_batch(
                    x, size, gen, max_rotate_deg=10.0 * s, max_scale=0.10 * s,
                    max_shift=0.08 * s, jitter=0.10 * s, flip=recipe.flip,
                )  # fmt: skip
            xs.append(x)
            idxs.append(idx)
        index = torch.cat(idxs)
        return FedBatches(torch.cat(xs), y_all[index], index, tuple(sizes))
    per_epoch = len(sizes) // recipe.plan.local_epochs
    for _ in range(recipe.plan.local_epochs):
        perm = torch.randperm(n, generator=gen)
        start = 0
        for b in range(per_epoch):
            idx = perm[start : start + sizes[b]]
            start += sizes[b]
            x = x_all[idx]
            if recipe.plan.augment:
                x = augment_batch(
                    x,
                    size,
                    gen,
                    max_rotate_deg=10.0 * s,
                    max_scale=0.10 * s,
                    max_shift=0.08 * s,
                    jitter=0.10 * s,
                    flip=recipe.flip,
                )
            xs.append(x)
            idxs.append(idx)
    index = torch.cat(idxs)
    return FedBatches(torch.cat(xs), y_all[index], index, tuple(sizes))


@contextmanager
def _batch_norm_inputs(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Record the input of every batch-norm layer in the block's forward passes."""
    seen: dict[str, Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:

            def hook(_m: nn.Module, args: tuple[Tensor, ...], name: str = name) -> None:
                seen[name] = args[0]

            handles.append(module.register_forward_pre_hook(hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _running_stats(model: nn.Module, inputs: Mapping[str, Tensor], buffers: Params) -> Params:
    """Batch norm's running-statistics update of one training step, differentiably."""
    out: Params = {}
    modules = dict(model.named_modules())
    for name, x in inputs.items():
        bn = modules[name]
        m = bn.momentum if bn.momentum is not None else 0.1
        dims = [0, *range(2, x.dim())]
        count = x.numel() // x.shape[1]
        mean = x.mean(dim=dims)
        var = x.var(dim=dims, unbiased=True) if count > 1 else torch.zeros_like(mean)
        rm, rv = f"{name}.running_mean", f"{name}.running_var"
        out[rm] = (1 - m) * buffers[rm] + m * mean
        out[rv] = (1 - m) * buffers[rv] + m * var
    return out


def soft_class_weights(labels: Tensor, num_classes: int, mode: str) -> Tensor | None:
    """``train_local``'s class weights, also for soft labels (an attack optimising them):
    N / (present * N_c) with N_c the summed label mass of class c."""
    if labels.dtype.is_floating_point:
        if mode == "none":
            return None
        counts = labels.sum(dim=0)
        return labels.shape[0] / (num_classes * counts.clamp(min=1e-6))
    return class_weights(labels.numpy(), num_classes, mode)


def weighted_cross_entropy(logits: Tensor, labels: Tensor, weight: Tensor | None) -> Tensor:
    """``F.cross_entropy(logits, labels, weight)``, also for soft labels (rows of ``labels``
    are class distributions): the weighted mean PyTorch takes for hard labels."""
    if not labels.dtype.is_floating_point:
        return F.cross_entropy(logits, labels, weight=weight)
    per_class = -labels * F.log_softmax(logits, dim=-1)
    if weight is None:
        return per_class.sum(dim=-1).mean()
    return (per_class * weight).sum() / (labels * weight).sum()


@dataclass(frozen=True)
class ReplayResult:
    params: Params  # after - before, per parameter
    buffers: Params  # after - before, per batch-norm running statistic


def replay(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    recipe: EnvoyRecipe,
    sizes: Sequence[int],
    *,
    create_graph: bool = True,
    noise: NoiseSource | None = None,
    noise_seed: int | None = None,
) -> ReplayResult:
    """The update ``train_local`` makes when it feeds ``images`` (already augmented) in
    batches of ``sizes``, as a function of the images (and of soft ``labels``).

    ``noise`` feeds the bottleneck's eps (None: whatever source the caller installed with
    ``gradient_leakage.bottleneck.noise_from``, by default the global RNG); ``noise_seed`` seeds the
    global RNG first, as ``train_local(seed=s)`` does with ``s + 1``. The model's modules
    keep the modes the caller set (the envoy trains in training mode; an attack may put only
    the bottleneck on its mean path); its weights and buffers are never modified.
    """
    if sum(sizes) != images.shape[0] or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{images.shape[0]} images and {labels.shape[0]} labels for batches {sizes}"
        )
    plan = recipe.plan
    num_classes = int(getattr(model, "num_classes", 2))
    epochs = plan.local_epochs
    first_epoch = labels[: sum(sizes) // epochs]
    weight = soft_class_weights(first_epoch, num_classes, recipe.class_weighting)
    names = [n for n, _ in model.named_parameters()]
    params0: Params = {n: p.detach() for n, p in model.named_parameters()}
    buffers0: Params = {n: b.detach().clone() for n, b in model.named_buffers()}
    running: Params = {}
    current: Params = {n: t.clone().requires_grad_(True) for n, t in params0.items()}
    momentum: Params = {}
    kl_fn = getattr(model, "kl_loss", None)
    keep = contextlib.nullcontext() if noise is None else noise_from(model, noise)
    with torch.random.fork_rng(devices=[], enabled=noise_seed is not None), keep:
        if noise_seed is not None:
            torch.manual_seed(noise_seed)
        start = 0
        for size in sizes:
            x = images[start : start + size]
            y = labels[start : start + size]
            start += size
            # Training-mode batch norm normalises by the batch and only writes the running
            # statistics, in place: hand it copies and follow the statistics here instead.
            state = {**current, **{n: b.clone() for n, b in buffers0.items()}}
            if recipe.privacy is not None:
                grads = _dp_gradient(model, state, x, y, recipe, names, create_graph)
            else:
                with _batch_norm_inputs(model) as bn_inputs:
                    logits = functional_call(model, state, (x,))
                loss = weighted_cross_entropy(logits, y, weight)
                if plan.kl_beta > 0 and kl_fn is not None:
                    loss = loss + plan.kl_beta * kl_fn()
                if model.training:
                    running.update(_running_stats(model, bn_inputs, {**buffers0, **running}))
                grads = list(
                    torch.autograd.grad(
                        loss,
                        [current[n] for n in names],
                        create_graph=create_graph,
                        allow_unused=True,
                    )
                )
            current = _sgd_step(current, dict(zip(names, grads, strict=True)), momentum, recipe)
    return ReplayResult(
        params={n: current[n] - params0[n] for n in names},
        buffers={n: running[n] - buffers0[n] for n in running},
    )


def _dp_gradient(
    model: nn.Module,
    state: Params,
    x: Tensor,
    y: Tensor,
    recipe: EnvoyRecipe,
    names: Sequence[str],
    create_graph: bool,
) -> list[Tensor]:
    """DP-SGD's gradient without its noise: every record's gradient clipped to the bound,
    summed, over the expected batch (with rate 1, the batch). The noise is the victim's
    secret; the attacker simulates its mean, zero."""
    dp = recipe.privacy
    assert dp is not None
    kl_fn = getattr(model, "kl_loss", None)
    weight = None if dp.class_weights is None else torch.tensor(dp.class_weights)
    total: list[Tensor] | None = None
    # train_local_dp draws the bottleneck's noise for each piece of at most physical_batch
    # records in one forward; the records go one by one here, so draw it as it does and
    # hand each record its slice (unless an attack installed its own source).
    bottlenecks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    batch_noise: dict[int, Tensor] = {}
    piece = dp.physical_batch

    def sliced(record: int) -> NoiseSource:
        def source(sigma: Tensor) -> Tensor:
            if record % piece == 0 or not batch_noise:
                rows = min(piece, x.shape[0] - record // piece * piece)
                batch_noise[0] = torch.randn((rows, *sigma.shape[1:]), dtype=sigma.dtype)
            return batch_noise[0][record % piece : record % piece + 1]

        return source

    own = bool(bottlenecks) and bottlenecks[0].noise_source is None
    for i in range(x.shape[0]):
        with noise_from(model, sliced(i)) if own else contextlib.nullcontext():
            logits = functional_call(model, state, (x[i : i + 1],))
        loss = weighted_cross_entropy(logits, y[i : i + 1], None)
        if weight is not None:
            loss = loss * (weight[y[i]] if not y.dtype.is_floating_point else (y[i] * weight).sum())
        if recipe.plan.kl_beta > 0 and kl_fn is not None:
            loss = loss + recipe.plan.kl_beta * kl_fn()
        raw = torch.autograd.grad(
            loss, [state[n] for n in names], create_graph=create_graph, allow_unused=True
        )
        grads = [
            g if g is not None else torch.zeros_like(state[n])
            for g, n in zip(raw, names, strict=True)
        ]
        norm = torch.stack([g.pow(2).sum() for g in grads]).sum().sqrt()
        coef = torch.clamp(dp.max_grad_norm / (norm + 1e-6), max=1.0)
        clipped = [g * coef for g in grads]
        total = clipped if total is None else [t + c for t, c in zip(total, clipped, strict=True)]
    assert total is not None
    return [t / x.shape[0] for t in total]


def _sgd_step(
    current: Params, grads: Mapping[str, Tensor | None], momentum: Params, recipe: EnvoyRecipe
) -> Params:
    """``clip_grad_norm_`` then ``torch.optim.SGD.step`` (Nesterov when momentum > 0), as
    functions: parameters without a gradient are skipped by both, as in torch."""
    plan = recipe.plan
    live = {n: g for n, g in grads.items() if g is not None}
    if recipe.max_grad_norm is not None and recipe.privacy is None and live:
        total = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g, 2) for g in live.values()]), 2
        )
        coef = torch.clamp(recipe.max_grad_norm / (total + 1e-6), max=1.0)
        live = {n: g * coef for n, g in live.items()}
    out = dict(current)
    for n, g in live.items():
        d = g + plan.weight_decay * current[n] if plan.weight_decay else g
        if plan.momentum:
            buf = d if n not in momentum else plan.momentum * momentum[n] + d
            momentum[n] = buf
            d = d + plan.momentum * buf  # Nesterov (train_local's make_optimizer)
        out[n] = current[n] - plan.lr * d
    return out


@dataclass(frozen=True)
class EnvoyProgram:
    """How ``envoys`` envoys, ``images_per_envoy`` each, turn their data into what the
    attacker observes: each runs ``train_local`` with ``recipe``; the observation is one
    envoy's update (``envoys == 1``) or the sample-weighted mean the director unmasks under
    secure aggregation. ``buffers`` says whether batch norm's running-statistic changes are
    part of it (they are in every real fedbus update: FedAvg averages them like weights).

    Implements ``gradient_leakage.observation.UpdateProgram``: the attacks call it on dummy
    fed images, ``slots`` per envoy (``images_per_envoy`` x local epochs).
    """

    recipe: EnvoyRecipe
    images_per_envoy: int
    envoys: int = 1
    buffers: bool = True
    sizes: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.images_per_envoy < 1 or self.envoys < 1:
            raise ValueError("images_per_envoy and envoys must be >= 1")
        object.__setattr__(self, "sizes", tuple(self.recipe.schedule(self.images_per_envoy)))

    @property
    def slots(self) -> int:
        """Images fed per envoy (every epoch feeds each image once)."""
        return sum(self.sizes)

    @property
    def steps(self) -> int:
        return len(self.sizes)

    def __call__(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        *,
        names: Sequence[str],
        create_graph: bool = True,
        noise_seeds: Sequence[int] | None = None,
    ) -> Params:
        total: Params = {}
        for e in range(self.envoys):
            part = slice(e * self.slots, (e + 1) * self.slots)
            res = replay(
                model,
                images[part],
                labels[part],
                self.recipe,
                self.sizes,
                create_graph=create_graph,
                noise_seed=None if noise_seeds is None else noise_seeds[e],
            )
            update = {**res.params, **(res.buffers if self.buffers else {})}
            for n in names:
                # Equal sample counts: the sample-weighted mean is the plain mean.
                term = update[n] / self.envoys
                total[n] = term if n not in total else total[n] + term
        return total

    def output_gradient(self, model: nn.Module, name: str, observed: Tensor) -> Tensor:
        """The output layer's loss gradient (summed over envoys) up to a positive factor,
        from its observed change: the first step's ``-lr (1 + m) (c g + wd p0)`` solved for
        ``g`` (``c`` the unknown clipping factor, later steps folded into the same sign)."""
        plan = self.recipe.plan
        p0 = dict(model.named_parameters())[name].detach().to(observed.dtype)
        step = plan.lr * (1 + plan.momentum) * self.steps
        return -observed * self.envoys / step - plan.weight_decay * p0 * self.envoys


def victim_update(
    model: nn.Module,
    images: np.ndarray | Tensor,
    labels: np.ndarray,
    recipe: EnvoyRecipe,
    seed: int,
) -> tuple[Params, Params]:
    """What the envoy sends: (parameter changes, running-statistic changes) of its real
    ``train_local`` on a copy of ``model``."""
    trained = _copy(model)
    recipe.train(trained, images, labels, seed)
    before = dict(model.named_parameters())
    params = {n: (p.detach() - before[n].detach()) for n, p in trained.named_parameters()}
    old = dict(model.named_buffers())
    buffers = {
        n: b.detach() - old[n].detach() for n, b in trained.named_buffers() if b.is_floating_point()
    }
    return params, buffers


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``; a bottleneck's record of its last forward (part of an
    attack's autograd graph, which cannot be copied) is left behind."""
    from gradient_leakage.bottleneck import Bottleneck

    held = [(m, m.last_mu, m.last_sigma) for m in model.modules() if isinstance(m, Bottleneck)]
    try:
        for m, _, _ in held:
            m.last_mu = m.last_sigma = None
        return copy.deepcopy(model)
    finally:
        for m, mu, sigma in held:
            m.last_mu, m.last_sigma = mu, sigma


def with_plan(recipe: EnvoyRecipe, **changes: Any) -> EnvoyRecipe:
    """The recipe with some plan fields changed (e.g. the learning rate of another round)."""
    return replace(recipe, plan=replace(recipe.plan, **changes))
