"""Record-level differential privacy for an envoy's local training: DP-SGD and its accountant.

The guarantee is per patient record: whatever else the director (or anyone reading the
bus) learns, the distribution of what an envoy sends changes by at most (epsilon, delta)
when one of its training records is added or removed. The mechanism is DP-SGD (Abadi et
al. 2016): every step samples each record independently with probability ``q`` (Poisson
sampling, which is what the accountant's privacy amplification assumes), clips each
record's gradient to L2 norm ``C``, adds Gaussian noise of standard deviation
``sigma * C`` to the sum, and divides by the expected batch size. Per-example gradients,
clipping and noise come from Opacus (``GradSampleModule``, ``DPOptimizer``); the
accountant is Opacus's RDP (Mironov 2017; Mironov, Talwar, Zhang 2019) or PRV (Gopi, Lee,
Wutschitz 2021) accountant. Momentum, weight decay and the learning rate act on the noisy
gradient only, so they are post-processing.

Two modes:

* ``local``: each envoy's own noise makes each of its updates DP on its own, so the
  guarantee holds even against a director that sees the update in the clear.
* ``distributed``: under secure aggregation the director only sees the sum of at least
  ``honest_envoys`` honest envoys' updates, so each adds ``1/honest_envoys`` of the noise
  variance and the sum carries the full ``sigma``. Only valid when every honest envoy
  evaluates its gradient at the same public weights, so a round is exactly one DP-SGD
  step (the aggregate is then one subsampled Gaussian mechanism over the union of the
  envoys' records; with several local steps the other envoys' noise never enters an
  envoy's own trajectory and no such bound holds). Trust assumption: in every round at
  least ``honest_envoys`` honest envoys are among the survivors whose sum is unmasked,
  and secure aggregation holds. An envoy's own update alone is then only as private as
  its share of the noise (``fallback_epsilon`` says how private).

What DP mode changes in the recipe, and why (each would otherwise break the bound):
batch norm is refused (it mixes records within a batch and its running statistics are
released without noise: use group norm or none); class weights must be public constants
(``train_local``'s balanced weights are computed from the envoy's own label counts); the
global gradient-norm clip is replaced by per-record clipping. The envoy must also keep
the sample count it reports public (a fixed weight) and not report its exact training
loss: both are statistics of the private records.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from node.errors import ExitCode, FedbusError
from node.training.batches import images_to_tensor
from node.training.train import (
    Progress,
    TrainResult,
    augment_batch,
    make_optimizer,
    model_device,
)
from protocol.messages import TrainPlan

if TYPE_CHECKING:
    from opacus.optimizers import DPOptimizer

Mode = Literal["local", "distributed"]
AccountantKind = Literal["rdp", "prv"]
ACCOUNTANTS = ("rdp", "prv")
MODES = ("local", "distributed")
# RDP orders searched for the tightest epsilon: Opacus's defaults stop at 63, too low for
# the large noise multipliers of small budgets (Opacus warns when the optimum sits there).
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)]
RDP_ORDERS += [float(a) for a in (80, 100, 128, 160, 200, 256, 320, 400, 512, 768, 1024)]


class PrivacyError(FedbusError, ValueError):
    """A model, recipe, setting or ledger under which the DP guarantee would not hold."""

    exit_code = ExitCode.CONFIG


@dataclass(frozen=True)
class PrivacySpend:
    """One call's DP-SGD steps, as the accountant composes them."""

    noise_multiplier: float  # sigma the guarantee counts on (the full sigma in distributed mode)
    sample_rate: float
    steps: int
    # distributed mode: the sigma of this envoy's own share (what protects its update if
    # secure aggregation fails); equal to noise_multiplier in local mode
    own_noise_multiplier: float


@dataclass(frozen=True)
class DPConfig:
    """How an envoy makes its training differentially private.

    ``noise_multiplier`` is sigma: the noise standard deviation of one step over the clip
    norm ``max_grad_norm`` (C). ``sample_rate`` is q (None: the plan's batch size over the
    envoy's record count). ``class_weights`` are public per-class loss weights (None: all 1).
    ``physical_batch`` bounds the records one forward/backward pass holds per-record
    gradients for (a Poisson batch larger than it is processed in pieces and stepped once):
    memory, not privacy - distributed mode's one step over every record would otherwise
    hold records x parameters floats at once (about 1.2 GB per 1,000 records here).
    """

    noise_multiplier: float
    max_grad_norm: float = 1.0
    sample_rate: float | None = None
    delta: float = 1e-5
    accountant: AccountantKind = "rdp"
    mode: Mode = "local"
    honest_envoys: int = 1
    class_weights: tuple[float, ...] | None = None
    physical_batch: int = 256

    def __post_init__(self) -> None:
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise PrivacyError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not self.max_grad_norm > 0:
            raise PrivacyError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.sample_rate is not None and not 0 < self.sample_rate <= 1:
            raise PrivacyError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if not 0 < self.delta < 1:
            raise PrivacyError(f"delta must be in (0, 1), got {self.delta}")
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if self.mode not in MODES:
            raise PrivacyError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.honest_envoys < 1:
            raise PrivacyError(f"honest_envoys must be >= 1, got {self.honest_envoys}")
        if self.mode == "local" and self.honest_envoys != 1:
            raise PrivacyError("honest_envoys only applies to mode 'distributed'")
        if self.physical_batch < 1:
            raise PrivacyError(f"physical_batch must be >= 1, got {self.physical_batch}")

    def rate(self, records: int, plan: TrainPlan) -> float:
        if records < 1:
            raise PrivacyError("no training records")
        return (
            self.sample_rate
            if self.sample_rate is not None
            else min(1.0, plan.batch_size / records)
        )

    def steps_per_round(self, records: int, plan: TrainPlan) -> int:
        """Local mode: ``local_epochs`` expected passes over the records; distributed: one."""
        if self.mode == "distributed":
            return 1
        return max(1, round(plan.local_epochs / self.rate(records, plan)))

    @property
    def own_noise_multiplier(self) -> float:
        """The sigma of this envoy's own noise: all of it locally, its share distributed."""
        if self.mode == "distributed":
            return self.noise_multiplier / math.sqrt(self.honest_envoys)
        return self.noise_multiplier


class PrivacyAccountant:
    """(epsilon, delta) spent by one envoy's records so far, composing every round's steps.

    ``history`` is a list of (sigma, q, steps), Opacus's own format: JSON-serialisable, so
    an envoy can keep it across restarts and the report can carry it.
    """

    def __init__(
        self, kind: AccountantKind = "rdp", history: Sequence[Sequence[float]] = ()
    ) -> None:
        if kind not in ACCOUNTANTS:
            raise PrivacyError(f"accountant must be one of {ACCOUNTANTS}, got {kind!r}")
        self.kind: AccountantKind = kind
        self.history: list[tuple[float, float, int]] = [
            (float(s), float(q), int(n)) for s, q, n in history
        ]

    def record(self, spend: PrivacySpend, *, own: bool = False) -> None:
        """Add one round's steps (``own``: count only this envoy's own noise)."""
        sigma = spend.own_noise_multiplier if own else spend.noise_multiplier
        if spend.steps < 1:
            return
        last = self.history[-1] if self.history else None
        if last is not None and last[0] == sigma and last[1] == spend.sample_rate:
            self.history[-1] = (sigma, spend.sample_rate, last[2] + spend.steps)
        else:
            self.history.append((sigma, spend.sample_rate, spend.steps))

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self, delta: float) -> float:
        """Epsilon at ``delta`` after everything recorded (0 before any step; inf when a
        step had no noise)."""
        if not self.history:
            return 0.0
        if any(s == 0 for s, _, _ in self.history):
            return math.inf
        return _epsilon(self.kind, self.history, delta)


def _epsilon(
    kind: AccountantKind, history: Sequence[tuple[float, float, int]], delta: float
) -> float:
    from opacus.accountants import create_accountant

    accountant = create_accountant(mechanism=kind)
    accountant.history = list(history)
    if kind == "rdp":
        return float(accountant.get_epsilon(delta=delta, alphas=RDP_ORDERS))
    return float(accountant.get_epsilon(delta=delta))


def calibrate_noise(
    target_epsilon: float,
    *,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: AccountantKind = "rdp",
    tolerance: float = 0.01,
) -> float:
    """The smallest sigma (to ``tolerance`` in epsilon) whose ``steps`` subsampled Gaussian
    steps at rate ``sample_rate`` spend at most ``target_epsilon`` at ``delta``."""
    if target_epsilon <= 0 or steps < 1:
        raise PrivacyError(f"need target_epsilon > 0 and steps >= 1, got {target_epsilon}, {steps}")
    low, high = 0.0, 1.0
    while _epsilon(accountant, [(high, sample_rate, steps)], delta) > target_epsilon:
        low, high = high, 2 * high
        if high > 1e6:
            raise PrivacyError(f"epsilon {target_epsilon} is out of reach at delta {delta}")
    while True:
        mid = (low + high) / 2
        eps = _epsilon(accountant, [(mid, sample_rate, steps)], delta)
        if eps <= target_epsilon:
            high = mid
            if target_epsilon - eps <= tolerance:
                return high
        else:
            low = mid
        if high - low < 1e-4:
            return high


@dataclass(frozen=True)
class DPTrainResult(TrainResult):
    spend: PrivacySpend | None = None
    clipped_fraction: float = 0.0  # share of sampled records whose gradient was clipped
    sampled: list[int] = field(default_factory=list)  # batch size of each step


def check_model(model: nn.Module) -> None:
    """Refuse what DP-SGD cannot make private: batch norm (it mixes records within a
    batch and its running statistics are released without noise)."""
    bad = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bad:
        raise PrivacyError(
            f"batch norm ({', '.join(bad[:3])}) is not compatible with record-level DP: it "
            "normalises each record by the batch and releases running statistics; build "
            "the model with norm 'group' (or 'none')"
        )


def _forward_backward(
    gsm: nn.Module,
    kl_fn: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    plan: TrainPlan,
    weight: torch.Tensor | None,
    gen: torch.Generator,
    *,
    size: int,
    augment_strength: float,
    flip: bool,
    dev: torch.device,
) -> tuple[float, float]:
    """One piece of a DP step: per-record gradients into the module's grad samples;
    returns the piece's mean loss and KL."""
    x, y = x.to(dev), y.to(dev)
    if plan.augment:
        s = augment_strength
        x = augment_batch(
            x, size, gen, max_rotate_deg=10.0 * s, max_scale=0.10 * s,
            max_shift=0.08 * s, jitter=0.10 * s, flip=flip,
        )  # fmt: skip
    logits = gsm(x)
    per_record = F.cross_entropy(logits, y, reduction="none")
    if weight is not None:
        per_record = per_record * weight[y]
    loss = per_record.mean()
    kl = kl_fn() if kl_fn is not None else torch.zeros((), device=dev)
    if plan.kl_beta > 0:
        loss = loss + plan.kl_beta * kl
    value = float(loss.detach())
    if math.isfinite(value):
        with warnings.catch_warnings():
            # The images need no gradient; Opacus's module hooks still fire, as wanted.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
    return value, float(kl.detach())


def train_local_dp(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray,
    plan: TrainPlan,
    dp: DPConfig,
    *,
    seed: int,
    noise: torch.Generator | None = None,
    progress: Progress | None = None,
    flip: bool = True,
    augment_strength: float = 1.0,
    device: torch.device | str | None = None,
) -> DPTrainResult:
    """DP-SGD version of ``train_local``: trains ``model`` in place and says what it spent.

    ``seed`` draws the Poisson samples, the augmentation and the bottleneck's noise, as in
    ``train_local``; ``noise`` is the generator of the DP noise, which must be
    unpredictable to everyone but the envoy (a CSPRNG-seeded generator; None: one seeded
    from ``seed``, for experiments only). ``noise`` must live on the device the model
    trains on (``device``, else where its parameters are); each sampled batch travels there.
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    check_model(model)
    if device is not None:
        model.to(device)
    dev = model_device(model)
    if not isinstance(images, (np.ndarray, torch.Tensor)):
        raise PrivacyError("DP training needs the records in memory (an array, not a Dataset)")
    x_all = images_to_tensor(images)
    y_all = torch.as_tensor(np.asarray(labels, np.int64).reshape(-1))
    n = int(y_all.shape[0])
    if n == 0 or x_all.shape[0] != n:
        raise PrivacyError(f"{x_all.shape[0]} images and {n} labels")
    q = dp.rate(n, plan)
    steps = dp.steps_per_round(n, plan)
    size = int(getattr(model, "image_size", x_all.shape[-1]))
    num_classes = int(getattr(model, "num_classes", 2))
    weight = None
    if dp.class_weights is not None:
        if len(dp.class_weights) != num_classes:
            raise PrivacyError(f"class_weights: {len(dp.class_weights)} for {num_classes} classes")
        weight = torch.tensor(dp.class_weights, dtype=torch.float32, device=dev)
    expected = q * n
    gen = torch.Generator().manual_seed(seed)
    noise_gen = noise if noise is not None else torch.Generator(dev).manual_seed(seed * 7 + 3)
    if noise_gen.device.type != dev.type:
        raise PrivacyError(f"the DP noise generator is on {noise_gen.device}, the model on {dev}")
    sigma = dp.own_noise_multiplier
    started = time.perf_counter()
    # Opacus's backward hooks cannot follow an activation that overwrites its input.
    inplace = [m for m in model.modules() if getattr(m, "inplace", False)]
    for m in inplace:
        m.inplace = False
    gsm = GradSampleModule(model, loss_reduction="mean")
    inner = make_optimizer(model, plan)
    optimizer = DPOptimizer(
        inner,
        noise_multiplier=sigma,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=expected,
        loss_reduction="mean",
        generator=noise_gen,
    )
    kl_fn = getattr(model, "kl_loss", None)
    model.train()
    loss_sum = kl_sum = 0.0
    seen = clipped = 0
    sampled: list[int] = []
    try:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed + 1)  # the bottleneck's noise
            for step in range(steps):
                idx = torch.nonzero(torch.rand(n, generator=gen) < q).flatten()
                sampled.append(int(idx.numel()))
                optimizer.zero_grad(set_to_none=True)
                if idx.numel() == 0:
                    _noise_only_step(inner, sigma * dp.max_grad_norm / expected, noise_gen)
                    continue
                # Pieces of at most physical_batch records: per-record gradients are
                # clipped and summed piece by piece, noised and stepped once (Opacus's
                # virtual steps); the same step as one pass, in bounded memory.
                pieces = torch.split(idx, dp.physical_batch)
                for j, piece in enumerate(pieces):
                    value, kl_value = _forward_backward(
                        gsm, kl_fn, x_all[piece], y_all[piece], plan, weight, gen,
                        size=size, augment_strength=augment_strength, flip=flip, dev=dev,
                    )  # fmt: skip
                    if not math.isfinite(value):
                        raise FloatingPointError(f"DP training diverged at step {step}")
                    clipped += _count_clipped(optimizer, dp.max_grad_norm)
                    last = j == len(pieces) - 1
                    if not last:
                        optimizer.signal_skip_step(do_skip=True)
                    optimizer.step()
                    if not last:
                        optimizer.zero_grad(set_to_none=True)  # keeps the summed clips
                    k = int(piece.numel())
                    loss_sum += value * k
                    kl_sum += kl_value * k
                    seen += k
                if progress is not None:
                    progress(step + 1, steps, loss_sum / seen)
    finally:
        gsm._close()
        for m in inplace:
            m.inplace = True
    spend = PrivacySpend(
        noise_multiplier=dp.noise_multiplier,
        sample_rate=q,
        steps=steps,
        own_noise_multiplier=sigma,
    )
    return DPTrainResult(
        num_samples=n,
        loss=loss_sum / max(1, seen),
        steps=steps,
        seconds=time.perf_counter() - started,
        kl_bits=kl_sum / max(1, seen),
        spend=spend,
        clipped_fraction=clipped / max(1, seen),
        sampled=sampled,
    )


def _noise_only_step(
    optimizer: torch.optim.Optimizer, std: float, generator: torch.Generator
) -> None:
    """An empty Poisson sample still releases a step: the noise alone, scaled as usual."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.normal(0.0, std, p.shape, generator=generator, device=p.device)
    optimizer.step()


def _count_clipped(optimizer: DPOptimizer, max_norm: float) -> int:
    """How many records of the step had a gradient norm above ``max_norm``."""
    samples = [
        p.grad_sample for p in optimizer.params if getattr(p, "grad_sample", None) is not None
    ]
    if not samples:
        return 0
    norms = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in samples], dim=1).norm(dim=1)
    return int((norms > max_norm).sum())


class PrivacyBudgetExhausted(PrivacyError):
    """Training one more round would spend beyond the envoy's ``max_epsilon``."""


LEDGER_NAME = "privacy.json"


class PrivacyLedger:
    """One envoy's privacy spend over the rounds, kept in ``path`` (JSON, written atomically)
    so that a restarted envoy goes on composing from where it stopped instead of from zero.

    ``epsilon`` is what the guarantee counts on (in distributed mode: the secure aggregate
    of at least ``honest_envoys`` honest envoys); ``own_epsilon`` what protects this envoy's
    update seen on its own (its share of the noise only; equal to ``epsilon`` locally).
    """

    def __init__(self, dp: DPConfig, path: Path | None, *, max_epsilon: float | None = None):
        self.dp, self.path, self.max_epsilon = dp, path, max_epsilon
        self.aggregate = PrivacyAccountant(dp.accountant)
        self.own = PrivacyAccountant(dp.accountant)
        self.rounds: list[dict[str, Any]] = []
        self._computed: dict[tuple[tuple[float, float, int], ...], float] = {}
        if path is not None and path.exists():
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            saved = json.loads(path.read_text())
            if saved["accountant"] != self.dp.accountant or saved["delta"] != self.dp.delta:
                raise PrivacyError(
                    f"{path}: kept with accountant {saved['accountant']} and delta "
                    f"{saved['delta']}, configured {self.dp.accountant} and {self.dp.delta}"
                )
            self.aggregate = PrivacyAccountant(self.dp.accountant, saved["history"])
            self.own = PrivacyAccountant(self.dp.accountant, saved["own_history"])
            self.rounds = list(saved["rounds"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if isinstance(exc, PrivacyError):
                raise
            # A ledger that cannot be read must not silently restart the count at zero.
            raise PrivacyError(f"{path}: unreadable privacy ledger ({exc})") from exc

    @property
    def epsilon(self) -> float:
        return self._epsilon(self.aggregate)

    @property
    def own_epsilon(self) -> float:
        # Locally the two accountants hold the same history: one computation serves both.
        return self._epsilon(self.own)

    def _epsilon(self, accountant: PrivacyAccountant) -> float:
        """The accountant's epsilon, computed once per history (the RDP optimum over ~170
        orders is not free, and the ledger and its summary ask several times)."""
        key = tuple(accountant.history)
        if key not in self._computed:
            self._computed[key] = accountant.epsilon(self.dp.delta)
        return self._computed[key]

    def check(self, records: int, plan: TrainPlan) -> None:
        """Refuse a round whose spend would take epsilon beyond ``max_epsilon``."""
        if self.max_epsilon is None:
            return
        spend = PrivacySpend(
            noise_multiplier=self.dp.noise_multiplier,
            sample_rate=self.dp.rate(records, plan),
            steps=self.dp.steps_per_round(records, plan),
            own_noise_multiplier=self.dp.own_noise_multiplier,
        )
        after = PrivacyAccountant(self.dp.accountant, self.aggregate.history)
        after.record(spend)
        projected = after.epsilon(self.dp.delta)
        if projected > self.max_epsilon:
            raise PrivacyBudgetExhausted(
                f"another round would spend epsilon {projected:.3f} > max_epsilon "
                f"{self.max_epsilon} (delta {self.dp.delta}); this envoy trains no more"
            )

    def record(self, spend: PrivacySpend, *, round: int | None) -> dict[str, Any]:
        """Add one round's spend; return (and persist) its entry."""
        self.aggregate.record(spend)
        self.own.record(spend, own=True)
        entry = {
            "round": round,
            "epsilon": self.epsilon,
            "own_epsilon": self.own_epsilon,
            "delta": self.dp.delta,
            "accountant": self.dp.accountant,
            "mode": self.dp.mode,
            "noise_multiplier": spend.noise_multiplier,
            "own_noise_multiplier": spend.own_noise_multiplier,
            "sample_rate": spend.sample_rate,
            "steps": spend.steps,
            "total_steps": self.aggregate.steps,
        }
        self.rounds.append(entry)
        if self.path is not None:
            from broker.files import atomic_write_text

            atomic_write_text(self.path, json.dumps(self.summary(), indent=1))
        return entry

    def summary(self) -> dict[str, Any]:
        """The ledger as JSON: settings, composed epsilon, history and per-round entries."""
        return {
            "accountant": self.dp.accountant,
            "delta": self.dp.delta,
            "mode": self.dp.mode,
            "honest_envoys": self.dp.honest_envoys,
            "noise_multiplier": self.dp.noise_multiplier,
            "max_grad_norm": self.dp.max_grad_norm,
            "epsilon": self.epsilon,
            "own_epsilon": self.own_epsilon,
            "history": [list(h) for h in self.aggregate.history],
            "own_history": [list(h) for h in self.own.history],
            "rounds": self.rounds,
        }


def read_ledger(path: Path) -> dict[str, Any] | None:
    """A ledger file's JSON (None when there is none), for reports."""
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
