"""What a gradient-inversion attacker observes, and the simulation it matches against.

An :class:`Observation` either carries an :class:`UpdateProgram` (the caller's exact replay
of how a victim made its update: ``node.attack.replay.EnvoyProgram`` replays the envoy's own
local training) or describes one of three simple protocols this module simulates itself:

* a single gradient (FedSGD, ``local_steps == 0``) of the mean cross-entropy over a batch;
* a FedAvg update: the weight delta after ``local_steps`` SGD steps over the envoy's data
  (the attacker knows the global weights it sent and the training plan, so it sees the
  delta and can replay the local steps on its dummy data);
* a secure aggregate over ``envoys`` envoys: the director only learns the SUM of their
  updates, never one envoy's update.

The victim's observation and the attacker's simulation run through the same
:func:`simulate` so the attacker models the protocol exactly; the only thing the attacker
lacks is the data (and any noise the victim's bottleneck drew in its forward pass).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

__all__ = [
    "Observation",
    "UpdateProgram",
    "bottleneck_modules",
    "bottleneck_sampling",
    "observe",
    "parameters_before_bottleneck",
    "simulate",
    "simulate_functional",
]

Params = dict[str, torch.Tensor]


class UpdateProgram(Protocol):
    """A victim's way of turning its images into the update the attacker observes, replayable
    on dummy images: ``envoys`` envoys, ``slots`` images fed by each (an image fed in several
    epochs fills several slots)."""

    @property
    def envoys(self) -> int: ...

    @property
    def slots(self) -> int: ...

    def __call__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        names: Sequence[str],
        create_graph: bool = True,
        noise_seeds: Sequence[int] | None = None,
    ) -> Params:
        """The observed tensors ``names`` (parameters, and any buffers the observation
        carries), differentiable in ``images``; ``noise_seeds`` replays the victims' exact
        bottleneck noise (only the noise oracle has them)."""
        ...

    def output_gradient(self, model: nn.Module, name: str, observed: torch.Tensor) -> torch.Tensor:
        """The loss gradient of output-layer parameter ``name``, summed over envoys, up to a
        positive factor, from its observed change (label recovery)."""
        ...


@dataclass(frozen=True)
class Observation:
    """An observed update: ``target[name]`` per parameter name, plus the protocol that made it.

    ``local_steps == 0`` means the tensors are gradients of the mean loss; otherwise they are
    weight deltas (after minus before) of ``local_steps`` SGD steps with learning rate ``lr``
    over mini-batches of ``batch_size`` taken cyclically from each envoy's images. With
    ``envoys > 1`` the tensors are the sum of every envoy's update, and each envoy held
    ``images_per_envoy`` images.
    """

    target: Mapping[str, torch.Tensor]
    images_per_envoy: int
    envoys: int = 1
    local_steps: int = 0
    lr: float = 0.0
    batch_size: int | None = None
    kl_weight: float = 0.0
    meta: Mapping[str, object] = field(default_factory=dict)
    program: UpdateProgram | None = None
    # The victims' secret noise seeds (one per envoy): only the noise oracle reads them.
    noise_seeds: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.program is not None and (
            self.images_per_envoy != self.program.slots or self.envoys != self.program.envoys
        ):
            raise ValueError(
                f"images_per_envoy={self.images_per_envoy}, envoys={self.envoys} do not fit "
                f"the program ({self.program.slots} slots x {self.program.envoys} envoys)"
            )
        if self.images_per_envoy < 1 or self.envoys < 1:
            raise ValueError(
                f"images_per_envoy={self.images_per_envoy} and envoys={self.envoys} must be >= 1"
            )
        if self.local_steps < 0:
            raise ValueError(f"local_steps={self.local_steps} must be >= 0")
        if self.local_steps > 0 and self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0 for a multi-step update")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if not self.target:
            raise ValueError("target: an observation needs at least one tensor")

    @property
    def num_images(self) -> int:
        return self.images_per_envoy * self.envoys

    @property
    def is_update(self) -> bool:
        """True for weight deltas, whose sign is opposite to the gradient's."""
        return self.local_steps > 0 or self.program is not None

    @classmethod
    def of_program(
        cls,
        program: UpdateProgram,
        target: Mapping[str, torch.Tensor],
        *,
        noise_seeds: Sequence[int] | None = None,
        meta: Mapping[str, object] | None = None,
    ) -> Observation:
        return cls(
            target=target,
            images_per_envoy=program.slots,
            envoys=program.envoys,
            program=program,
            noise_seeds=tuple(noise_seeds) if noise_seeds is not None else None,
            meta=dict(meta or {}),
        )


def bottleneck_modules(model: nn.Module) -> list[nn.Module]:
    """Submodules that are variational bottlenecks (CVB, PRECODE), in registration order.

    Recognised by the ``Bottleneck`` base class of :mod:`gradient_leakage.bottleneck` when it
    is importable, and by duck typing otherwise (a submodule with its own ``kl_loss``) so the
    attacks work on any model that follows the same convention.
    """
    try:
        from gradient_leakage.bottleneck import Bottleneck
    except ImportError:  # the bottleneck module is optional for the attacks
        Bottleneck = None
    found = []
    for name, module in model.named_modules():
        if not name:
            continue
        if (Bottleneck is not None and isinstance(module, Bottleneck)) or callable(
            getattr(module, "kl_loss", None)
        ):
            found.append(module)
    # A bottleneck nested inside another recognised one is part of it.
    return [m for m in found if not any(m is not o and _contains(o, m) for o in found)]


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


@contextmanager
def bottleneck_sampling(model: nn.Module, sample: bool) -> Iterator[None]:
    """Temporarily switch only the bottlenecks between sampling and their deterministic mean.

    The rest of the model keeps its mode, so batch-norm layers behave as in the victim's
    training step while the attacker, who cannot know the victim's noise draw, may use the
    bottleneck's mean path.
    """
    modules = bottleneck_modules(model)
    saved = [(m, m.training) for mod in modules for m in mod.modules()]
    try:
        for mod in modules:
            mod.train(sample)
        yield
    finally:
        for m, mode in saved:
            m.training = mode


def parameters_before_bottleneck(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the parameters used before the first bottleneck in the forward pass.

    Found by running ``example`` through the model and recording the order in which modules
    first execute, so it follows the real data flow rather than the registration order.
    An empty list means the first layer already is the bottleneck; the full list is
    returned when the model has no bottleneck.
    """
    bottlenecks = bottleneck_modules(model)
    names = [n for n, _ in model.named_parameters()]
    if not bottlenecks:
        return names
    order: list[nn.Module] = []
    seen: set[int] = set()
    stop = [False]
    bottleneck_ids = {id(b) for b in bottlenecks}
    inner_ids = {id(m) for b in bottlenecks for m in b.modules()}

    def pre_hook(module: nn.Module, _args: object) -> None:
        if stop[0]:
            return
        if id(module) in bottleneck_ids:
            stop[0] = True
            return
        if id(module) not in seen and id(module) not in inner_ids:
            seen.add(id(module))
            order.append(module)

    handles = [m.register_forward_pre_hook(pre_hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    before_ids = {id(m) for m in order}
    chosen = []
    for mod_name, module in model.named_modules():
        if id(module) not in before_ids:
            continue
        for p_name, _ in module.named_parameters(recurse=False):
            chosen.append(f"{mod_name}.{p_name}" if mod_name else p_name)
    # Keep the model's own parameter order.
    chosen_set = set(chosen)
    return [n for n in names if n in chosen_set]


def _loss(
    model: nn.Module, state: Params, x: torch.Tensor, y: torch.Tensor, kl_weight: float
) -> torch.Tensor:
    logits = functional_call(model, state, (x,))
    if y.dtype.is_floating_point:  # soft labels (DLG optimises a label distribution)
        loss = torch.sum(-y * F.log_softmax(logits, dim=-1), dim=-1).mean()
    else:
        loss = F.cross_entropy(logits, y)
    if kl_weight:
        kl = getattr(model, "kl_loss", None)
        if callable(kl):
            loss = loss + kl_weight * kl()
    return loss


def simulate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    obs: Observation,
    *,
    names: Sequence[str] | None = None,
    create_graph: bool = True,
    oracle: bool = False,
) -> Params:
    """The update ``images``/``labels`` would produce under ``obs``'s protocol.

    Differentiable in ``images`` (and in soft ``labels``) when ``create_graph`` is set, which is
    what the attacks optimise. Returns tensors only for ``names`` (default: every parameter),
    though the local steps always update every parameter. Buffers (batch-norm statistics) are
    copied so the model is never modified. ``oracle`` replays the victims' own noise draws
    (``obs.noise_seeds``), which no realistic attacker has.
    """
    if images.shape[0] != obs.num_images:
        raise ValueError(f"images: {images.shape[0]} given, observation has {obs.num_images}")
    if oracle and obs.noise_seeds is None:
        raise ValueError("oracle: the observation does not carry the victims' noise seeds")
    all_names = [n for n, _ in model.named_parameters()]
    wanted = list(all_names if names is None else names)
    if obs.program is not None:
        return obs.program(
            model,
            images,
            labels,
            names=wanted,
            create_graph=create_graph,
            noise_seeds=obs.noise_seeds if oracle else None,
        )
    with _seeded(obs.noise_seeds[0] if oracle and obs.noise_seeds else None):
        return _simulate_simple(model, images, labels, obs, wanted, create_graph)


def _simulate_simple(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    obs: Observation,
    wanted: Sequence[str],
    create_graph: bool,
) -> Params:
    params0: Params = {n: p.detach() for n, p in model.named_parameters()}
    buffers: Params = {n: b.detach().clone() for n, b in model.named_buffers()}
    total: Params = {}
    per = obs.images_per_envoy
    for envoy in range(obs.envoys):
        x = images[envoy * per : (envoy + 1) * per]
        y = labels[envoy * per : (envoy + 1) * per]
        update = _envoy_update(model, params0, buffers, x, y, obs, wanted, create_graph)
        for n in wanted:
            total[n] = update[n] if n not in total else total[n] + update[n]
    return total


def _envoy_update(
    model: nn.Module,
    params0: Params,
    buffers: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    obs: Observation,
    wanted: Sequence[str],
    create_graph: bool,
) -> Params:
    names = list(params0)
    if obs.local_steps == 0:
        leaves = {n: p.detach().requires_grad_(True) for n, p in params0.items()}
        loss = _loss(model, {**leaves, **buffers}, x, y, obs.kl_weight)
        grads = torch.autograd.grad(
            loss, [leaves[n] for n in wanted], create_graph=create_graph, allow_unused=True
        )
        return {
            n: (g if g is not None else torch.zeros_like(leaves[n]))
            for n, g in zip(wanted, grads, strict=True)
        }
    bs = obs.batch_size or x.shape[0]
    current: Params = {n: p.detach().requires_grad_(True) for n, p in params0.items()}
    start = 0
    for _ in range(obs.local_steps):
        idx = [(start + i) % x.shape[0] for i in range(min(bs, x.shape[0]))]
        start = (start + bs) % x.shape[0]
        loss = _loss(model, {**current, **buffers}, x[idx], y[idx], obs.kl_weight)
        grads = torch.autograd.grad(
            loss, [current[n] for n in names], create_graph=create_graph, allow_unused=True
        )
        current = {
            n: (current[n] - obs.lr * g) if g is not None else current[n]
            for n, g in zip(names, grads, strict=True)
        }
    return {n: current[n] - params0[n] for n in wanted}


def simulate_functional(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    obs: Observation,
    names: Sequence[str],
) -> Params:
    """:func:`simulate` written with ``torch.func.grad`` so it can run under ``vmap``.

    Attacks on many independent victims vmap this over the victims: one batched pass
    instead of one pass per victim, with each victim's result exactly its own (the victims
    never share a forward pass, so batch-norm models, whose statistics would mix them, are
    not supported here; use :func:`simulate` for those).
    """
    params0: Params = {n: p.detach() for n, p in model.named_parameters()}
    buffers: Params = {n: b.detach() for n, b in model.named_buffers()}
    per = obs.images_per_envoy
    total: Params = {}
    for envoy in range(obs.envoys):
        x = images[envoy * per : (envoy + 1) * per]
        y = labels[envoy * per : (envoy + 1) * per]

        def loss_of(params: Params, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            return _loss(model, {**params, **buffers}, xb, yb, obs.kl_weight)

        if obs.local_steps == 0:
            g = grad(loss_of)(params0, x, y)
            update = {n: g[n] for n in names}
        else:
            bs = obs.batch_size or x.shape[0]
            current = dict(params0)
            start = 0
            for _ in range(obs.local_steps):
                idx = [(start + i) % x.shape[0] for i in range(min(bs, x.shape[0]))]
                start = (start + bs) % x.shape[0]
                g = grad(loss_of)(current, x[idx], y[idx])
                current = {n: current[n] - obs.lr * g[n] for n in current}
            update = {n: current[n] - params0[n] for n in names}
        for n in names:
            total[n] = update[n] if n not in total else total[n] + update[n]
    return total


def observe(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    envoys: int = 1,
    local_steps: int = 0,
    lr: float = 0.0,
    batch_size: int | None = None,
    kl_weight: float = 0.0,
    generator_seed: int | None = None,
) -> Observation:
    """The victim side: what the envoys send, as the attacker will see it.

    ``images`` are split into ``envoys`` equal shares, one per envoy. The model runs in
    training mode, so a variational bottleneck draws its reparameterisation noise exactly as
    in a real training step (seeded by ``generator_seed`` for reproducible benchmarks).
    """
    if images.shape[0] % envoys:
        raise ValueError(f"images: {images.shape[0]} do not split evenly over {envoys} envoys")
    spec = Observation(
        target={"_": torch.zeros(1)},
        images_per_envoy=images.shape[0] // envoys,
        envoys=envoys,
        local_steps=local_steps,
        lr=lr,
        batch_size=batch_size,
        kl_weight=kl_weight,
    )
    was_training = model.training
    model.train()
    try:
        with _seeded(generator_seed):
            target = simulate(model, images, labels, spec, create_graph=False)
    finally:
        model.train(was_training)
    return Observation(
        target={n: t.detach() for n, t in target.items()},
        images_per_envoy=spec.images_per_envoy,
        envoys=envoys,
        local_steps=local_steps,
        lr=lr,
        batch_size=batch_size,
        kl_weight=kl_weight,
        noise_seeds=None if generator_seed is None else (generator_seed,),
    )


@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
