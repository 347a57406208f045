"""Gradient-inversion attacks: DLG, iDLG, Inverting Gradients and the adaptive attack.

Every attack is model-agnostic: it takes the model (architecture and weights, which an
honest-but-curious server knows), an :class:`~gradient_leakage.observation.Observation`
(a gradient, a FedAvg weight delta, or a secure-aggregation sum) and returns a
:class:`Reconstruction` of the victim batch in the model's input space.

* :class:`DLG` (Zhu et al. 2019): L-BFGS jointly on a dummy image and a dummy soft label,
  minimising the squared L2 distance between simulated and observed gradients.
* :class:`IDLG` (Zhao et al. 2020): reads the label off the sign of the last layer's
  gradient, then DLG on the image alone.
* :class:`InvertingGradients` (Geiping et al. 2020): cosine distance between gradients plus
  total variation, Adam on the sign of the image gradient, pixels boxed into the valid
  range, step learning-rate decay at 3/8, 5/8, 7/8 of the run, best of several restarts.
* :class:`AdaptiveAttack` (Balunovic et al. 2022; Scheliga et al. 2023's adaptive attack on
  their own defence): Inverting Gradients matching only the gradients of the layers before
  the variational bottleneck, because the bottleneck's noise scrambles everything it and the
  later layers see. With CVB right after the first convolution that leaves conv1 alone.

The attacker runs the model in training mode (batch-norm as in the victim's step) but, by
default, takes the bottleneck's deterministic mean path: it knows the weights but cannot
know the noise the victim drew. ``bottleneck="sample"`` draws fresh noise every iteration
instead (an expectation-over-noise attacker).

Inverting Gradients can differentiate through a smooth stand-in for ReLU
(``smooth_relu=beta``: Softplus of sharpness beta, see :func:`relus_as_softplus`). Gradient
matching differentiates the simulated *gradient* with respect to the image; through a ReLU
that second derivative ignores which units the image switches on and off (the ReLU's
derivative is a step, whose own derivative is zero), so the attack cannot steer the
activation pattern and stalls in a local minimum. The observation still comes from the
victim's exact model; every restart is scored on the exact model too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import structlog
import torch
import torch.nn.functional as F
from torch import nn

from gradient_leakage.observation import (
    Observation,
    bottleneck_modules,
    bottleneck_sampling,
    parameters_before_bottleneck,
    simulate,
    simulate_functional,
)

__all__ = [
    "ATTACKS",
    "DLG",
    "IDLG",
    "AdaptiveAttack",
    "AttackProgress",
    "EOTAttack",
    "GradientAttack",
    "InvertingGradients",
    "JointNoiseAttack",
    "NoiseOracle",
    "Reconstruction",
    "TwoStageAttack",
    "build_attack",
    "gradient_distance",
    "infer_labels",
    "relus_as_softplus",
    "total_variation",
]

log = structlog.get_logger(__name__)

BottleneckMode = Literal["mean", "sample"]
LabelMode = Literal["auto", "infer", "joint"]


@dataclass(frozen=True)
class AttackProgress:
    """A snapshot handed to the progress callback every ``progress_every`` iterations."""

    attack: str
    trial: int
    trials: int
    iteration: int
    iterations: int
    loss: float
    images: torch.Tensor  # detached copy of the current reconstruction, model input space
    # Which victims (positions in reconstruct_many's list) `images` holds, in order; a
    # batched run reports all of them at once, each victim's images contiguous.
    victims: tuple[int, ...] = (0,)


@dataclass
class Reconstruction:
    images: torch.Tensor  # (N, C, H, W) in the model's input space, order arbitrary
    labels: torch.Tensor  # (N,) int64, the labels the attack used or recovered
    loss: float  # the attack objective of the returned trial
    trial_losses: list[float] = field(default_factory=list)
    matched_parameters: list[str] = field(default_factory=list)


ProgressFn = Callable[[AttackProgress], None]


def gradient_distance(
    simulated: dict[str, torch.Tensor],
    observed: dict[str, torch.Tensor] | object,
    names: Sequence[str],
    kind: Literal["cosine", "l2"],
) -> torch.Tensor:
    """Distance between two updates over the parameters ``names``.

    ``cosine`` is one minus the cosine of the angle between the two updates as single
    vectors (all layers concatenated, equal weights), as in Geiping et al.; ``l2`` is the
    squared Euclidean distance summed over layers, as in DLG.
    """
    obs = observed  # a Mapping[str, Tensor]
    if kind == "l2":
        return sum(((simulated[n] - obs[n]) ** 2).sum() for n in names)  # type: ignore[index]
    dot = sum((simulated[n] * obs[n]).sum() for n in names)  # type: ignore[index]
    s_norm = sum(simulated[n].pow(2).sum() for n in names)
    o_norm = sum(obs[n].pow(2).sum() for n in names)  # type: ignore[index]
    return 1.0 - dot / (s_norm.sqrt() * o_norm.sqrt() + 1e-12)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation: mean absolute difference of horizontal and vertical
    neighbours (Geiping et al.'s image prior)."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy


@contextmanager
def relus_as_softplus(model: nn.Module, beta: float) -> Iterator[None]:
    """Within the block, every ``nn.ReLU`` module of ``model`` is ``Softplus(beta)``.

    Parameters are untouched, so simulated updates still compare with the observation;
    the larger ``beta``, the closer to ReLU (and the rougher the landscape). The original
    modules are back on exit, whatever happens. Raises if the model has no ``nn.ReLU``
    module: a ReLU called functionally cannot be swapped, and an option that silently does
    nothing would mislead.
    """
    if beta <= 0:
        raise ValueError(f"beta={beta} must be > 0")
    relus = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.ReLU)
    ]
    if not relus:
        raise ValueError("smooth_relu: the model has no nn.ReLU module to replace")
    try:
        for parent, name, _ in relus:
            setattr(parent, name, nn.Softplus(beta=beta))
        yield
    finally:
        for parent, name, child in relus:
            setattr(parent, name, child)


def _output_layer(model: nn.Module) -> tuple[str, str | None]:
    """Names of the classifier's weight and bias: the last 2-D parameter and its bias."""
    params = list(model.named_parameters())
    for name, p in reversed(params):
        if p.dim() == 2:
            prefix = name.rsplit(".", 1)[0] if "." in name else ""
            bias = f"{prefix}.bias" if prefix else "bias"
            shapes = dict(params)
            if bias in shapes and shapes[bias].shape == (p.shape[0],):
                return name, bias
            return name, None
    raise ValueError("model has no 2-D (fully connected) parameter to read labels from")


def _num_classes(model: nn.Module) -> int:
    weight, _ = _output_layer(model)
    return int(dict(model.named_parameters())[weight].shape[0])


def infer_labels(model: nn.Module, obs: Observation, image_shape: Sequence[int]) -> torch.Tensor:
    """Recover the victim labels from the output layer's update, without any image.

    For a softmax cross-entropy loss the gradient of the output bias is ``mean(p - y)``:
    negative only at the classes in the batch. One image: the class of the most negative
    entry (iDLG's rule; on the weight rows, ``(p - y) h`` with ``h >= 0`` after a ReLU, when
    the layer has no bias). Several images: label counts ``N (p̄ - g)`` where ``g`` is the
    mean-gradient estimate and ``p̄`` the model's mean prediction on a blank input, rounded
    to a total of ``N`` by largest remainders. A weight delta points against the gradient,
    so its sign is flipped first.
    """
    weight, bias = _output_layer(model)
    name = bias if bias is not None and bias in obs.target else weight
    if name not in obs.target:
        raise ValueError(f"observation lacks the output layer ({weight}) needed to infer labels")
    g = obs.target[name].detach().to(torch.float64).clone()
    if obs.program is not None:
        g = obs.program.output_gradient(model, name, g)
    elif obs.is_update:
        g = -g / (obs.lr * obs.local_steps)
    if name == weight:
        g = g.sum(dim=1)
    g = g / obs.envoys
    n = obs.num_images
    if n == 1:
        return torch.argmin(g).reshape(1)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            p_mean = F.softmax(model(torch.zeros(1, *image_shape)), dim=-1)[0].to(torch.float64)
    finally:
        model.train(was_training)
    if bias is None:
        p_mean = torch.zeros_like(g)  # weight rows carry an unknown positive scale
    counts_f = (n * (p_mean - g)).clamp(min=0)
    if float(counts_f.sum()) <= 0:
        counts_f = (-g).clamp(min=0) + 1e-9
    counts_f = counts_f * (n / counts_f.sum())
    counts = counts_f.floor().long()
    for c in torch.argsort(counts_f - counts, descending=True)[: n - int(counts.sum())]:
        counts[c] += 1
    return torch.repeat_interleave(torch.arange(g.numel()), counts)


class GradientAttack(ABC):
    """One gradient-inversion attack with its configuration."""

    name: str = ""

    def __init__(
        self,
        *,
        iterations: int,
        restarts: int = 1,
        box: tuple[float, float] | None = None,
        bottleneck: BottleneckMode = "mean",
        contrast: tuple[float, float] | None = None,
    ) -> None:
        if iterations < 1 or restarts < 1:
            raise ValueError(f"iterations={iterations} and restarts={restarts} must be >= 1")
        if box is not None and not box[0] < box[1]:
            raise ValueError(f"box={box}: lower bound must be below upper bound")
        if bottleneck not in ("mean", "sample"):
            raise ValueError(f"bottleneck={bottleneck!r}: expected 'mean' or 'sample'")
        self.iterations = iterations
        self.restarts = restarts
        self.box = box
        self.bottleneck: BottleneckMode = bottleneck
        if contrast is not None and contrast[1] <= 0:
            raise ValueError(f"contrast={contrast}: the RMS deviation must be > 0")
        self.contrast = contrast

    def matched_parameters(self, model: nn.Module, image_shape: Sequence[int]) -> list[str]:
        """Which parameters' updates the attack compares (default: all)."""
        del image_shape
        return [n for n, _ in model.named_parameters()]

    def reconstruct(
        self,
        model: nn.Module,
        observation: Observation,
        image_shape: Sequence[int],
        *,
        labels: torch.Tensor | None = None,
        progress: ProgressFn | None = None,
        progress_every: int = 100,
        seed: int = 0,
    ) -> Reconstruction:
        """Reconstruct the ``observation.num_images`` victim images of shape ``image_shape``.

        ``labels`` are the true labels when the threat model grants them; otherwise each
        attack recovers them its own way. ``seed`` fixes the random initialisations.
        """
        if progress_every < 1:
            raise ValueError(f"progress_every={progress_every} must be >= 1")
        shape = (observation.num_images, *image_shape)
        names = matched_buffers(model, self.matched_parameters(model, image_shape), observation)
        missing = [n for n in names if n not in observation.target]
        if missing:
            raise ValueError(f"observation lacks parameters the attack matches: {missing[:3]}")
        generator = torch.Generator().manual_seed(seed)
        was_training = model.training
        model.train()
        best: Reconstruction | None = None
        losses: list[float] = []
        try:
            with bottleneck_sampling(model, self.bottleneck == "sample"):
                for trial in range(self.restarts):
                    result = self._trial(
                        model,
                        observation,
                        shape,
                        names,
                        labels,
                        generator,
                        trial,
                        progress,
                        progress_every,
                    )
                    losses.append(result.loss)
                    if best is None or _better(result.loss, best.loss):
                        best = result
        finally:
            model.train(was_training)
        assert best is not None
        best.trial_losses = losses
        best.matched_parameters = list(names)
        return best

    def reconstruct_many(
        self,
        model: nn.Module,
        observations: Sequence[Observation],
        image_shape: Sequence[int],
        *,
        labels: Sequence[torch.Tensor | None] | None = None,
        progress: ProgressFn | None = None,
        progress_every: int = 100,
        seeds: Sequence[int] | None = None,
    ) -> list[Reconstruction]:
        """Attack several independent victims (one observation each).

        The result for victim ``k`` equals ``reconstruct(..., seed=seeds[k])``; attacks that
        can, run all victims in one batched pass (see :class:`InvertingGradients`).
        """
        k = len(observations)
        labels_list = list(labels) if labels is not None else [None] * k
        seed_list = list(seeds) if seeds is not None else list(range(k))
        if len(labels_list) != k or len(seed_list) != k:
            raise ValueError("reconstruct_many: labels and seeds must have one entry per victim")
        out = []
        for v, (obs, lab, seed) in enumerate(
            zip(observations, labels_list, seed_list, strict=True)
        ):

            def relay(p: AttackProgress, v: int = v) -> None:
                assert progress is not None
                progress(dataclasses.replace(p, victims=(v,)))

            out.append(
                self.reconstruct(
                    model,
                    obs,
                    image_shape,
                    labels=lab,
                    progress=relay if progress is not None else None,
                    progress_every=progress_every,
                    seed=seed,
                )
            )
        return out

    @abstractmethod
    def _trial(
        self,
        model: nn.Module,
        obs: Observation,
        shape: tuple[int, ...],
        names: list[str],
        labels: torch.Tensor | None,
        generator: torch.Generator,
        trial: int,
        progress: ProgressFn | None,
        progress_every: int,
    ) -> Reconstruction: ...

    def _clamp(self, x: torch.Tensor) -> None:
        """Project onto the feasible set: the contrast gauge (if any), then the pixel box."""
        with torch.no_grad():
            if self.contrast is not None:  # per image: the last three dims are (C, H, W)
                center, rms = self.contrast
                dev = x - center
                scale = rms / dev.flatten(-3).pow(2).mean(dim=-1).sqrt().clamp(min=1e-8)
                x.copy_(center + dev * scale[..., None, None, None])
            if self.box is not None:
                x.clamp_(self.box[0], self.box[1])

    def _init(self, shape: tuple[int, ...], kind: str, generator: torch.Generator) -> torch.Tensor:
        if kind == "randn":
            x = torch.randn(shape, generator=generator)
        elif kind == "rand":
            lo, hi = self.box if self.box is not None else (0.0, 1.0)
            x = lo + (hi - lo) * torch.rand(shape, generator=generator)
        elif kind == "zeros":
            x = torch.zeros(shape)
        else:
            raise ValueError(f"init={kind!r}: expected randn, rand or zeros")
        self._clamp(x)
        return x.requires_grad_(True)


def matched_buffers(model: nn.Module, names: Sequence[str], obs: Observation) -> list[str]:
    """``names`` plus the observed running statistics of every normalisation layer whose
    own parameters are among them (an update with batch-norm statistics in it: they are
    matched alongside the layer's weights, never without them)."""
    modules = {n.rsplit(".", 1)[0] for n in names if "." in n}
    buffers = [
        n
        for n, b in model.named_buffers()
        if n in obs.target and b.is_floating_point() and n.rsplit(".", 1)[0] in modules
    ]
    return [*names, *buffers]


def split_names(model: nn.Module, names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(parameter names, buffer names) among ``names``."""
    params = {n for n, _ in model.named_parameters()}
    return [n for n in names if n in params], [n for n in names if n not in params]


def _better(a: float, b: float) -> bool:
    if math.isnan(a):
        return False
    return math.isnan(b) or a < b


class DLG(GradientAttack):
    """Deep Leakage from Gradients (Zhu, Liu, Han 2019).

    Defaults from the paper's code: dummy image and dummy label logits from N(0, 1), L-BFGS
    with learning rate 1 (20 inner evaluations per step), 300 steps, squared L2 gradient
    distance, no image prior and no box.
    """

    name = "dlg"
    init = "randn"

    def __init__(
        self,
        *,
        iterations: int = 300,
        lr: float = 1.0,
        restarts: int = 1,
        inner_steps: int = 20,
        box: tuple[float, float] | None = None,
        bottleneck: BottleneckMode = "mean",
        contrast: tuple[float, float] | None = None,
    ) -> None:
        super().__init__(
            iterations=iterations,
            restarts=restarts,
            box=box,
            bottleneck=bottleneck,
            contrast=contrast,
        )
        if lr <= 0 or inner_steps < 1:
            raise ValueError(f"lr={lr} must be > 0 and inner_steps={inner_steps} >= 1")
        self.lr = lr
        self.inner_steps = inner_steps

    def _labels(
        self,
        model: nn.Module,
        obs: Observation,
        shape: tuple[int, ...],
        labels: torch.Tensor | None,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(learnable label logits or None, labels used in the loss)."""
        del obs
        if labels is not None:
            return None, labels
        k = _num_classes(model)
        logits = torch.randn((shape[0], k), generator=generator).requires_grad_(True)
        return logits, logits

    def _trial(self, model, obs, shape, names, labels, generator, trial, progress, progress_every):  # type: ignore[override]
        x = self._init(shape, self.init, generator)
        label_logits, label_var = self._labels(model, obs, shape, labels, generator)
        variables = [x] if label_logits is None else [x, label_logits]
        optimizer = torch.optim.LBFGS(variables, lr=self.lr, max_iter=self.inner_steps)
        target = obs.target
        last_good = x.detach().clone()

        def objective() -> torch.Tensor:
            y = F.softmax(label_var, dim=-1) if label_logits is not None else label_var
            sim = simulate(model, x, y, obs, names=names)
            return gradient_distance(sim, target, names, "l2")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = objective()
            grads = torch.autograd.grad(loss, variables)
            for v, g in zip(variables, grads, strict=True):
                v.grad = g
            return loss

        loss_value = math.inf
        for it in range(1, self.iterations + 1):
            loss = optimizer.step(closure)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value) or not torch.isfinite(x).all():
                # L-BFGS occasionally diverges; keep the last finite iterate.
                with torch.no_grad():
                    x.copy_(last_good)
                break
            last_good = x.detach().clone()
            if progress is not None and (it % progress_every == 0 or it == self.iterations):
                progress(
                    AttackProgress(
                        self.name, trial, self.restarts, it, self.iterations, loss_value, last_good
                    )
                )
        # L-BFGS needs the unconstrained iterate; DLG's answer is projected only at the end.
        with torch.no_grad():
            x.copy_(last_good)
        self._clamp(x)
        last_good = x.detach().clone()
        final = float(objective().detach())
        if label_logits is not None:
            used = label_logits.detach().argmax(dim=-1)
        else:
            used = label_var.detach()
        return Reconstruction(images=last_good, labels=used, loss=final)


class IDLG(DLG):
    """Improved DLG (Zhao, Mopuri, Bilen 2020): the label comes analytically from the sign of
    the output layer's gradient (see :func:`infer_labels`), then L-BFGS on the image alone.
    Defaults from the paper's code: uniform [0, 1) init, L-BFGS lr 1, 300 steps, L2 distance.
    """

    name = "idlg"
    init = "rand"

    def _labels(self, model, obs, shape, labels, generator):  # type: ignore[override]
        del generator
        if labels is None:
            labels = infer_labels(model, obs, shape[1:])
        return None, labels


class InvertingGradients(GradientAttack):
    """Inverting Gradients (Geiping, Bauermeister, Dröge, Moeller 2020).

    Defaults from the paper: cosine gradient distance over all layers, total variation
    weight 0.1 (inversefed's default, mean-difference TV), Adam with learning rate 0.1 on the
    sign of the gradient, pixels boxed into ``box``, learning rate times 0.1 at 3/8, 5/8 and
    7/8 of 24,000 iterations, N(0, 1) init, best of ``restarts`` by final objective. Labels
    are recovered with :func:`infer_labels` unless given. ``smooth_relu`` (off in the paper)
    optimises through Softplus(``smooth_relu``) in place of every ReLU (see the module
    docstring); the final objective that ranks restarts is always the exact model's.
    """

    name = "ig"

    def __init__(
        self,
        *,
        iterations: int = 24_000,
        lr: float = 0.1,
        tv_weight: float = 0.1,
        restarts: int = 1,
        signed: bool = True,
        lr_decay: bool = True,
        init: str = "randn",
        box: tuple[float, float] | None = (0.0, 1.0),
        bottleneck: BottleneckMode = "mean",
        contrast: tuple[float, float] | None = None,
        parameters: Sequence[str] | None = None,
        smooth_relu: float | None = None,
        label_mode: LabelMode = "auto",
        buffer_weight: float = 1.0,
        label_lr: float = 0.1,
    ) -> None:
        super().__init__(
            iterations=iterations,
            restarts=restarts,
            box=box,
            bottleneck=bottleneck,
            contrast=contrast,
        )
        if lr <= 0 or tv_weight < 0:
            raise ValueError(f"lr={lr} must be > 0 and tv_weight={tv_weight} >= 0")
        if init not in ("randn", "rand", "zeros"):
            raise ValueError(f"init={init!r}: expected randn, rand or zeros")
        if smooth_relu is not None and smooth_relu <= 0:
            raise ValueError(f"smooth_relu={smooth_relu} must be > 0 (None: the exact ReLU)")
        self.lr = lr
        self.tv_weight = tv_weight
        self.signed = signed
        self.lr_decay = lr_decay
        self.init_kind = init
        self.parameters = list(parameters) if parameters is not None else None
        self.smooth_relu = smooth_relu
        if label_mode not in ("auto", "infer", "joint"):
            raise ValueError(f"label_mode={label_mode!r}: expected auto, infer or joint")
        if buffer_weight < 0 or label_lr <= 0:
            raise ValueError(f"buffer_weight={buffer_weight} must be >= 0, label_lr={label_lr} > 0")
        self.label_mode: LabelMode = label_mode
        self.buffer_weight = buffer_weight
        self.label_lr = label_lr

    def _smoothed(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        """The model as the optimisation differentiates through it."""
        if self.smooth_relu is None:
            return contextlib.nullcontext()
        return relus_as_softplus(model, self.smooth_relu)

    def _descend(
        self,
        model: nn.Module,
        x: torch.Tensor,
        objective: Callable[[torch.Tensor], torch.Tensor],
        trial: int,
        progress: ProgressFn | None,
        progress_every: int,
        victims: tuple[int, ...] | None = None,
        extra: Sequence[tuple[torch.Tensor, float]] = (),
    ) -> None:
        """Signed Adam on ``x`` in place, stepped learning rate, through the smoothed model.

        ``objective`` gives one loss, or one per victim when ``victims`` says ``x`` holds
        several (victim first); they never interact, so their sum is descended. ``extra``
        are further unknowns (soft labels, noise), each with its own plain-Adam step size.
        """
        groups = [{"params": [x], "lr": self.lr}] + [{"params": [v], "lr": lr} for v, lr in extra]
        optimizer = torch.optim.Adam(groups)
        milestones = [int(self.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=milestones if self.lr_decay else [], gamma=0.1
        )
        variables = [x, *(v for v, _ in extra)]
        with self._smoothed(model):
            for it in range(1, self.iterations + 1):
                optimizer.zero_grad()
                losses = objective(x)
                grads = torch.autograd.grad(losses.sum(), variables)
                x.grad = grads[0].sign() if self.signed else grads[0]
                for v, g in zip(variables[1:], grads[1:], strict=True):
                    v.grad = g
                optimizer.step()
                scheduler.step()
                self._clamp(x)
                if progress is not None and (it % progress_every == 0 or it == self.iterations):
                    images = x.detach() if victims is None else x.detach().flatten(0, 1)
                    progress(
                        AttackProgress(
                            self.name,
                            trial,
                            self.restarts,
                            it,
                            self.iterations,
                            float(losses.detach().mean()),
                            images.clone(),
                            victims or (0,),
                        )
                    )

    def matched_parameters(self, model: nn.Module, image_shape: Sequence[int]) -> list[str]:
        if self.parameters is not None:
            known = {n for n, _ in model.named_parameters()}
            unknown = [n for n in self.parameters if n not in known]
            if unknown:
                raise ValueError(f"parameters: the model has no {unknown[:3]}")
            return list(self.parameters)
        return super().matched_parameters(model, image_shape)

    def _distance(self, model: nn.Module, obs: Observation, sim: dict, names: Sequence[str]):
        """Cosine distance of the parameters' updates, plus ``buffer_weight`` times that of
        the running statistics (on their own scale) when they are matched."""
        params, buffers = split_names(model, names)
        loss = gradient_distance(sim, obs.target, params, "cosine")
        if buffers and self.buffer_weight:
            loss = loss + self.buffer_weight * gradient_distance(sim, obs.target, buffers, "cosine")
        return loss

    def _simulated_distance(self, model, obs, x, y, names) -> torch.Tensor:
        """The match of the update ``x`` and ``y`` simulate to the observed one (subclasses
        change how the bottleneck's noise enters)."""
        return self._distance(model, obs, simulate(model, x, y, obs, names=names), names)

    def _objective(self, model, obs, x, y, names) -> torch.Tensor:
        loss = self._simulated_distance(model, obs, x, y, names)
        if self.tv_weight:
            loss = loss + self.tv_weight * total_variation(x)
        return loss

    def _joint_labels(self, obs: Observation, labels: torch.Tensor | None) -> bool:
        """Whether the labels are unknowns: asked for, or (``auto``) an envoy's recipe
        update of several images, whose output layer does not give the label counts away
        (class-balanced weights make the output bias's gradient the same for every split of
        a batch with both classes)."""
        if labels is not None:
            return False
        if self.label_mode == "auto":
            return obs.program is not None and obs.images_per_envoy > 1
        return self.label_mode == "joint"

    def _extra_variables(
        self, model: nn.Module, obs: Observation, x: torch.Tensor, y: torch.Tensor | None,
        names: Sequence[str], generator: torch.Generator,
    ) -> list[tuple[torch.Tensor, float]]:  # fmt: skip
        """Unknowns besides the images (none here; the joint noise attack adds its noise)."""
        del model, obs, x, y, names, generator
        return []

    def _trial(self, model, obs, shape, names, labels, generator, trial, progress, progress_every):  # type: ignore[override]
        label_logits = None
        if self._joint_labels(obs, labels):
            label_logits = torch.zeros(shape[0], _num_classes(model), requires_grad=True)
            y_fixed = None
        else:
            y_fixed = labels if labels is not None else infer_labels(model, obs, shape[1:])
        x = self._init(shape, self.init_kind, generator)

        def current_labels() -> torch.Tensor:
            return y_fixed if label_logits is None else F.softmax(label_logits, dim=-1)

        extra = self._extra_variables(model, obs, x, y_fixed, names, generator)
        if label_logits is not None:
            extra = [*extra, (label_logits, self.label_lr)]
        self._descend(
            model,
            x,
            lambda z: self._objective(model, obs, z, current_labels(), names),
            trial,
            progress,
            progress_every,
            extra=extra,
        )
        final = float(self._objective(model, obs, x, current_labels(), names).detach())
        used = current_labels() if label_logits is None else label_logits.detach().argmax(dim=-1)
        return Reconstruction(images=x.detach().clone(), labels=used.detach().clone(), loss=final)

    def reconstruct_many(  # type: ignore[override]
        self,
        model: nn.Module,
        observations: Sequence[Observation],
        image_shape: Sequence[int],
        *,
        labels: Sequence[torch.Tensor | None] | None = None,
        progress: ProgressFn | None = None,
        progress_every: int = 100,
        seeds: Sequence[int] | None = None,
    ) -> list[Reconstruction]:
        """All victims in one ``vmap``-ed pass: the victims never interact (the objective is a
        sum of per-victim terms and Adam is elementwise), so each gets exactly the run it
        would get alone, at a fraction of the cost on a CPU. Falls back to one victim at a
        time for models vmap cannot batch (batch-norm in training mode)."""
        k = len(observations)
        if k <= 1 or not _same_protocol(observations):
            return super().reconstruct_many(
                model,
                observations,
                image_shape,
                labels=labels,
                progress=progress,
                progress_every=progress_every,
                seeds=seeds,
            )
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            return super().reconstruct_many(
                model,
                observations,
                image_shape,
                labels=labels,
                progress=progress,
                progress_every=progress_every,
                seeds=seeds,
            )
        if progress_every < 1:
            raise ValueError(f"progress_every={progress_every} must be >= 1")
        labels_list = list(labels) if labels is not None else [None] * k
        seed_list = list(seeds) if seeds is not None else list(range(k))
        if len(labels_list) != k or len(seed_list) != k:
            raise ValueError("reconstruct_many: labels and seeds must have one entry per victim")
        names = self.matched_parameters(model, image_shape)
        for obs in observations:
            missing = [n for n in names if n not in obs.target]
            if missing:
                raise ValueError(f"observation lacks parameters the attack matches: {missing[:3]}")
        shape = (observations[0].num_images, *image_shape)
        generators = [torch.Generator().manual_seed(s) for s in seed_list]
        was_training = model.training
        model.train()
        best: list[Reconstruction | None] = [None] * k
        losses: list[list[float]] = [[] for _ in range(k)]
        try:
            with bottleneck_sampling(model, self.bottleneck == "sample"):
                ys = torch.stack(
                    [
                        lab if lab is not None else infer_labels(model, obs, image_shape)
                        for lab, obs in zip(labels_list, observations, strict=True)
                    ]
                )
                for trial in range(self.restarts):
                    results = self._trial_many(
                        model,
                        observations,
                        shape,
                        names,
                        ys,
                        generators,
                        trial,
                        progress,
                        progress_every,
                    )
                    for v, res in enumerate(results):
                        losses[v].append(res.loss)
                        if best[v] is None or _better(res.loss, best[v].loss):  # type: ignore[union-attr]
                            best[v] = res
        finally:
            model.train(was_training)
        out = []
        for v in range(k):
            res = best[v]
            assert res is not None
            res.trial_losses = losses[v]
            res.matched_parameters = list(names)
            out.append(res)
        return out

    def _trial_many(
        self,
        model: nn.Module,
        observations: Sequence[Observation],
        shape: tuple[int, ...],
        names: list[str],
        ys: torch.Tensor,
        generators: Sequence[torch.Generator],
        trial: int,
        progress: ProgressFn | None,
        progress_every: int,
    ) -> list[Reconstruction]:
        spec = observations[0]
        targets = {n: torch.stack([o.target[n] for o in observations]) for n in names}
        x = torch.stack([self._init(shape, self.init_kind, g).detach() for g in generators])
        x.requires_grad_(True)
        tv = self.tv_weight

        def one(xk: torch.Tensor, yk: torch.Tensor, tk: dict[str, torch.Tensor]) -> torch.Tensor:
            sim = simulate_functional(model, xk, yk, spec, names)
            loss = gradient_distance(sim, tk, names, "cosine")
            return loss + tv * total_variation(xk) if tv else loss

        objective = torch.func.vmap(one, randomness="different")
        victims = tuple(range(len(observations)))
        self._descend(
            model, x, lambda z: objective(z, ys, targets), trial, progress, progress_every, victims
        )
        with torch.no_grad():
            final = objective(x, ys, targets)
        return [
            Reconstruction(images=x[v].detach().clone(), labels=ys[v].clone(), loss=float(final[v]))
            for v in victims
        ]


def _same_protocol(observations: Sequence[Observation]) -> bool:
    """Whether the victims' updates come from one simple protocol that ``vmap`` can batch
    (a replayed program, e.g. the envoy's recipe, runs victim by victim)."""
    first = observations[0]
    if any(o.program is not None for o in observations):
        return False
    return all(
        (o.images_per_envoy, o.envoys, o.local_steps, o.lr, o.batch_size, o.kl_weight)
        == (
            first.images_per_envoy,
            first.envoys,
            first.local_steps,
            first.lr,
            first.batch_size,
            first.kl_weight,
        )
        and set(o.target) == set(first.target)
        for o in observations
    )


class AdaptiveAttack(InvertingGradients):
    """Inverting Gradients restricted to the layers before the variational bottleneck.

    The bottleneck's reparameterisation noise makes the gradients of the bottleneck and of
    every later layer a function of a random draw the attacker never sees; the layers
    before it still receive a gradient that depends on the input directly. This attack
    matches only those (Balunovic et al. 2022's adaptive attack on PRECODE; Scheliga et al.
    2023 evaluate CVB against it). On a model without a bottleneck it is plain IG.
    """

    name = "adaptive"

    def matched_parameters(self, model: nn.Module, image_shape: Sequence[int]) -> list[str]:
        if self.parameters is not None or not bottleneck_modules(model):
            return super().matched_parameters(model, image_shape)
        was_training = model.training
        model.eval()
        try:
            names = parameters_before_bottleneck(model, torch.zeros(1, *image_shape))
        finally:
            model.train(was_training)
        if not names:
            raise ValueError(
                "the bottleneck is the model's first layer: no gradient before it to match"
            )
        return names


class EOTAttack(InvertingGradients):
    """Expectation over transformation (Athalye et al. 2018) over the bottleneck's noise:
    every iteration matches the mean distance of ``samples`` updates simulated with fresh
    noise draws, so the reconstruction fits what the noise does on average rather than one
    draw (the mean path, IG's default, is one particular and untypical draw: eps = 0)."""

    name = "eot"

    def __init__(self, *, samples: int = 4, **config: object) -> None:
        config.setdefault("bottleneck", "sample")
        super().__init__(**config)  # type: ignore[arg-type]
        if samples < 1:
            raise ValueError(f"samples={samples} must be >= 1")
        self.samples = samples

    def _simulated_distance(self, model, obs, x, y, names) -> torch.Tensor:
        draws = [
            self._distance(model, obs, simulate(model, x, y, obs, names=names), names)
            for _ in range(self.samples)
        ]
        return torch.stack(draws).mean()


class NoiseOracle(InvertingGradients):
    """Inverting Gradients handed the victims' own noise draws (``Observation.noise_seeds``).

    Not an attack anyone can run while the noise comes from a CSPRNG the director cannot
    predict: an upper bound that measures what the noise's secrecy is worth.
    """

    name = "oracle"

    def __init__(self, **config: object) -> None:
        config.setdefault("bottleneck", "sample")
        super().__init__(**config)  # type: ignore[arg-type]

    def _simulated_distance(self, model, obs, x, y, names) -> torch.Tensor:
        sim = simulate(model, x, y, obs, names=names, oracle=True)
        return self._distance(model, obs, sim, names)


class _NoiseVariables:
    """One free tensor per bottleneck draw of a simulation, handed out in draw order: the
    attacker's guess of the victim's noise (``JointNoiseAttack``) or, via eps = (z - mu) /
    sigma, of the latent itself (``TwoStageAttack``)."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []
        self._next = 0

    def record(
        self, make: Callable[[torch.Tensor], torch.Tensor]
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """A noise source that creates a tensor per draw (from ``make(sigma)``)."""

        def source(sigma: torch.Tensor) -> torch.Tensor:
            t = make(sigma).detach().requires_grad_(True)
            self.tensors.append(t)
            return t

        return source

    def replay(self, transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        """A noise source handing out the tensors in order (``transform(tensor, sigma)``
        turns each into eps)."""
        self._next = 0

        def source(sigma: torch.Tensor) -> torch.Tensor:
            if self._next >= len(self.tensors):
                raise RuntimeError("the simulation drew more noise than was recorded")
            t = self.tensors[self._next]
            self._next += 1
            if t.shape != sigma.shape:
                raise RuntimeError(
                    f"noise of shape {tuple(t.shape)} for sigma {tuple(sigma.shape)}"
                )
            return t if transform is None else transform(t, sigma)

        return source


def _first_bottleneck(model: nn.Module) -> nn.Module:
    found = bottleneck_modules(model)
    if not found:
        raise ValueError("the model has no variational bottleneck")
    return found[0]


class JointNoiseAttack(InvertingGradients):
    """Inverting Gradients that also optimises the victim's noise: every bottleneck draw of
    the simulated update is an unknown, started from N(0, 1) and held near it by a
    Gaussian prior (``noise_weight`` times half the mean squared draw)."""

    name = "joint"

    def __init__(
        self, *, noise_weight: float = 0.1, noise_lr: float = 0.01, **config: object
    ) -> None:
        config.setdefault("bottleneck", "sample")
        super().__init__(**config)  # type: ignore[arg-type]
        if noise_weight < 0 or noise_lr <= 0:
            raise ValueError(f"noise_weight={noise_weight} must be >= 0, noise_lr={noise_lr} > 0")
        self.noise_weight = noise_weight
        self.noise_lr = noise_lr
        self._noise: _NoiseVariables | None = None

    def _extra_variables(self, model, obs, x, y, names, generator):  # type: ignore[override]
        from gradient_leakage.bottleneck import noise_from

        _first_bottleneck(model)
        noise = _NoiseVariables()
        labels = y if y is not None else torch.full((x.shape[0], _num_classes(model)), 0.5)
        with noise_from(model, noise.record(lambda s: torch.randn(s.shape, generator=generator))):
            simulate(model, x.detach(), labels, obs, names=names)
        self._noise = noise
        return [(t, self.noise_lr) for t in noise.tensors]

    def _simulated_distance(self, model, obs, x, y, names) -> torch.Tensor:
        from gradient_leakage.bottleneck import noise_from

        assert self._noise is not None
        with noise_from(model, self._noise.replay()):
            sim = simulate(model, x, y, obs, names=names)
        prior = torch.stack([t.pow(2).mean() for t in self._noise.tensors]).mean() / 2
        return self._distance(model, obs, sim, names) + self.noise_weight * prior


class TwoStageAttack(InvertingGradients):
    """Latent first, then the image by a linear solve.

    Stage 1 treats the bottleneck's sampled latent z (what every later layer sees) as the
    unknown, with the noise folded in, and matches the updates of the bottleneck's decoder
    and every later layer (which depend on the image only through z); signed Adam as in
    Inverting Gradients. Stage 2 inverts the image from z: the latent's mean
    mu = encoder(conv1(x)) is affine in x, so x is the boxed, total-variation-regularised
    least-squares solution of mu(x) = z, which averages the noise over the latent channels.
    """

    name = "two-stage"

    def __init__(
        self, *, decode_iterations: int = 300, decode_lr: float = 0.05, decode_tv: float = 0.01,
        **config: object,
    ) -> None:  # fmt: skip
        config.setdefault("bottleneck", "sample")
        super().__init__(**config)  # type: ignore[arg-type]
        if decode_iterations < 1 or decode_lr <= 0 or decode_tv < 0:
            raise ValueError("decode_iterations >= 1, decode_lr > 0 and decode_tv >= 0 needed")
        self.decode_iterations = decode_iterations
        self.decode_lr = decode_lr
        self.decode_tv = decode_tv

    def matched_parameters(self, model: nn.Module, image_shape: Sequence[int]) -> list[str]:
        if self.parameters is not None:
            return super().matched_parameters(model, image_shape)
        bottleneck = _first_bottleneck(model)
        prefix = next(n for n, m in model.named_modules() if m is bottleneck)
        before = set(parameters_before_bottleneck(model, torch.zeros(1, *image_shape)))
        decoder = {
            f"{prefix}.{n}" for n, _ in bottleneck.named_parameters() if n.startswith("decoder")
        }
        return [
            n
            for n, _ in model.named_parameters()
            if n not in before and (not n.startswith(prefix + ".") or n in decoder)
        ]

    def _trial(self, model, obs, shape, names, labels, generator, trial, progress, progress_every):  # type: ignore[override]
        from gradient_leakage.bottleneck import noise_from

        bottleneck = _first_bottleneck(model)
        x0 = self._init(shape, self.init_kind, generator).detach()
        joint = self._joint_labels(obs, labels)
        label_logits = (
            torch.zeros(shape[0], _num_classes(model), requires_grad=True) if joint else None
        )
        y_fixed = (
            None
            if joint
            else (labels if labels is not None else infer_labels(model, obs, shape[1:]))
        )

        def current_labels() -> torch.Tensor:
            return y_fixed if label_logits is None else F.softmax(label_logits, dim=-1)

        # Stage 1: one latent per bottleneck draw, started at a draw around the random
        # image's mean path; eps = (z - mu) / sigma makes the draw exactly z.
        latents = _NoiseVariables()

        def start(sigma: torch.Tensor) -> torch.Tensor:
            mu = bottleneck.last_mu.detach()
            return mu + sigma.detach() * torch.randn(sigma.shape, generator=generator)

        with noise_from(model, latents.record(start)):
            simulate(model, x0, current_labels().detach(), obs, names=names)

        def as_eps(z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return (z - bottleneck.last_mu) / sigma

        def objective() -> torch.Tensor:
            with noise_from(model, latents.replay(as_eps)):
                sim = simulate(model, x0, current_labels(), obs, names=names)
            return self._distance(model, obs, sim, names)

        variables = list(latents.tensors) + ([label_logits] if label_logits is not None else [])
        groups = [{"params": list(latents.tensors), "lr": self.lr}]
        if label_logits is not None:
            groups.append({"params": [label_logits], "lr": self.label_lr})
        optimizer = torch.optim.Adam(groups)
        milestones = [int(self.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=milestones if self.lr_decay else [], gamma=0.1
        )
        loss = torch.zeros(())
        with self._smoothed(model):
            for it in range(1, self.iterations + 1):
                optimizer.zero_grad()
                loss = objective()
                grads = torch.autograd.grad(loss, variables)
                for v, g in zip(variables, grads, strict=True):
                    v.grad = g.sign() if (self.signed and v is not label_logits) else g
                optimizer.step()
                scheduler.step()
                if progress is not None and (it % progress_every == 0 or it == self.iterations):
                    images = self._decode(model, latents.tensors, shape, x0, iterations=50)
                    progress(
                        AttackProgress(
                            self.name, trial, self.restarts, it, self.iterations,
                            float(loss.detach()), images,
                        )
                    )  # fmt: skip
        images = self._decode(model, latents.tensors, shape, x0, iterations=self.decode_iterations)
        used = current_labels() if label_logits is None else label_logits.detach().argmax(dim=-1)
        return Reconstruction(
            images=images, labels=used.detach().clone(), loss=float(objective().detach())
        )

    def _decode(
        self, model: nn.Module, latents: Sequence[torch.Tensor], shape: tuple[int, ...],
        x0: torch.Tensor, *, iterations: int,
    ) -> torch.Tensor:  # fmt: skip
        """Stage 2: the boxed, TV-regularised least-squares image of each recovered latent
        under the (affine) mean path of everything up to the bottleneck."""
        z = torch.cat([t.detach() for t in latents])
        if z.shape[0] != shape[0]:
            raise ValueError(f"{z.shape[0]} latents for {shape[0]} images")
        mean_path = _mean_path(model)
        x = x0.clone().requires_grad_(True)
        scale = z.pow(2).mean().clamp(min=1e-12)
        optimizer = torch.optim.Adam([x], lr=self.decode_lr)
        for _ in range(iterations):
            optimizer.zero_grad()
            loss = (mean_path(x) - z).pow(2).mean() / scale
            if self.decode_tv:
                loss = loss + self.decode_tv * total_variation(x)
            loss.backward()
            optimizer.step()
            self._clamp(x)
        return x.detach()


def _mean_path(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> the first bottleneck's mean mu(x), by running the model up to it."""
    bottleneck = _first_bottleneck(model)

    class _Stop(Exception):
        pass

    def run(x: torch.Tensor) -> torch.Tensor:
        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            raise _Stop(
                bottleneck.mu_encoder(args[0]) if hasattr(bottleneck, "mu_encoder") else None
            )

        handle = bottleneck.register_forward_pre_hook(hook)
        try:
            model(x)
        except _Stop as stop:
            (mu,) = stop.args
            if mu is None:
                raise ValueError(
                    "two-stage decoding needs a convolutional bottleneck (CVB)"
                ) from None
            return mu
        finally:
            handle.remove()
        raise RuntimeError("the forward pass never reached the bottleneck")

    return run


ATTACKS: dict[str, type[GradientAttack]] = {
    "dlg": DLG,
    "idlg": IDLG,
    "ig": InvertingGradients,
    "adaptive": AdaptiveAttack,
    "eot": EOTAttack,
    "joint": JointNoiseAttack,
    "two-stage": TwoStageAttack,
    "oracle": NoiseOracle,
}


def build_attack(name: str, **config: object) -> GradientAttack:
    """The attack called ``name`` (dlg, idlg, ig, adaptive) with ``config`` over its defaults."""
    try:
        cls = ATTACKS[name]
    except KeyError:
        raise ValueError(f"attack={name!r}: expected one of {', '.join(ATTACKS)}") from None
    return cls(**config)  # type: ignore[arg-type]
