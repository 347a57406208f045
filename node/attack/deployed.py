"""The model and the update the federation deploys, and what each threat setting observes.

Everything comes from the director's config, the one place the federation reads it from:
the ``[model]`` the envoys build (architecture, norm, defence), the ``[train]`` plan
(including the KL weight ``kl_beta``) and the learning-rate schedule that sets the plan of
the attacked round. The attacked weights are the public initial weights of round 1 or a
federated checkpoint's current weights (the round after it).

Threat settings (what the attacker holds besides the weights it sent):

* ``update``: one envoy's parameter changes, as a director without secure aggregation
  (``insecure_plain_aggregation``) or a malicious one that breaks it would see them;
* ``update+bn``: the same update with its batch-norm running-statistic changes, which
  every real fedbus update carries (FedAvg averages them like weights);
* ``aggregate``: what the director unmasks under secure aggregation: the sample-weighted
  mean of ``envoys`` envoys' updates, running statistics included;
* ``gradient``: the stress test, not a deployed setting: one gradient of one batch, no local
  training (on the group-norm sibling this is where the attacks of the literature work).

The victim's side always runs the envoy's own ``train_local`` (see
:mod:`node.attack.replay`); its seeds stand for the secrets a CSPRNG gives each envoy
(shuffle, augmentation, bottleneck noise), derived here from ``--seed`` so a benchmark
replays, and handed to nobody but the noise oracle and the scorer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gradient_leakage.observation import Observation, observe
from node.attack.replay import EnvoyProgram, EnvoyRecipe, fed_batches, victim_update
from node.training.privacy import DPConfig

REPO = Path(__file__).resolve().parents[2]
DIRECTOR_CONFIG = REPO / "configs" / "director.toml"
THREATS = ("update", "update+bn", "aggregate", "gradient")
DEPLOYED_THREATS = ("update", "update+bn", "aggregate")
# The secret seeds of victim envoy g under --seed s (training seed; train_local draws the
# bottleneck noise from seed + 1).
_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class Deployment:
    """The attacked federation: model, weights, and the recipe of the attacked round."""

    config_path: str
    model_kwargs: dict[str, Any]
    init_seed: int
    recipe: EnvoyRecipe
    round: int
    weights: dict[str, np.ndarray] | None = None  # None: the public initial weights
    weights_source: str = "initial weights (round 1)"

    @property
    def norm(self) -> str:
        return str(self.model_kwargs.get("norm") or "batch")

    @property
    def defense(self) -> str:
        return str(self.model_kwargs["defense"])

    def build_model(self) -> nn.Module:
        from node.training.model import build_model
        from node.training.weights import set_weights

        model = build_model(**self.model_kwargs, seed=self.init_seed)
        if self.weights is not None:
            batch_norm = any(k.endswith("running_mean") for k in self.weights)
            if batch_norm != (self.norm == "batch"):
                trained = "batch" if batch_norm else "group or none"
                raise ValueError(
                    f"trained weights ({self.weights_source}) are of a {trained}-norm model, "
                    f"but the attacked model has norm {self.norm}; pass the norm it was "
                    "trained with (--norm)"
                )
            set_weights(model, self.weights)
        return model


def load_trained_weights(path: str) -> tuple[dict[str, np.ndarray], int | None]:
    """(weights, last completed round or None) from an .npz of named arrays or a director
    state folder (its checkpoint's current weights: what the next round starts from)."""
    p = Path(path)
    if p.suffix == ".npz" and p.is_file():
        with np.load(p, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}, None
    from node.checkpoint import CHECKPOINT_NAME, load_checkpoint

    state_dir = p.parent if p.is_file() and p.name == CHECKPOINT_NAME else p
    ckpt = load_checkpoint(state_dir)
    if ckpt is None:
        raise FileNotFoundError(f"--trained {path}: no .npz and no {CHECKPOINT_NAME} there")
    return ckpt.weights_numpy(), ckpt.round


def load_deployment(
    config_path: str | Path | None = None,
    *,
    trained: str | None = None,
    round: int | None = None,
    defense: str | None = None,
    norm: str | None = None,
    arch: str | None = None,
    kl_beta: float | None = None,
    privacy: DPConfig | None = None,
) -> Deployment:
    """The deployment the director config describes; ``defense``/``norm``/``arch`` override
    its ``[model]`` (controls and the stress test), ``kl_beta`` its KL weight (explicitly
    only: by default the attack uses the federation's own); ``privacy`` makes the envoys
    train with DP-SGD (every record in the one step: see ``EnvoyRecipe``)."""
    from node.config import load_director_config, model_kwargs
    from node.director import train_plan_for_round

    path = Path(config_path) if config_path is not None else DIRECTOR_CONFIG
    cfg = load_director_config(path)
    kwargs = model_kwargs(cfg.model)
    for key, value in (("defense", defense), ("norm", norm), ("arch", arch)):
        if value is not None:
            kwargs[key] = value
    kwargs.setdefault("norm", "batch")
    weights: dict[str, np.ndarray] | None = None
    last_round: int | None = 0
    source = "initial weights (round 1)"
    if trained:
        weights, last_round = load_trained_weights(trained)
        source = f"{trained}" + (f" (after round {last_round})" if last_round is not None else "")
    attacked = round if round is not None else (last_round or 0) + 1
    if attacked < 1:
        raise ValueError(f"--round must be >= 1, got {attacked}")
    plan = train_plan_for_round(cfg, min(attacked, cfg.rounds))
    if kl_beta is not None:
        from dataclasses import replace

        plan = replace(plan, kl_beta=kl_beta)
    return Deployment(
        config_path=str(path),
        model_kwargs=kwargs,
        init_seed=cfg.model.init_seed,
        recipe=EnvoyRecipe.deployed(plan, privacy),
        round=attacked,
        weights=weights,
        weights_source=source,
    )


def victim_seed(seed: int, group: int) -> int:
    """The secret training seed of victim envoy ``group`` (train_local's ``seed``)."""
    return (seed * _SEED_STRIDE + 7919 * group + 17) % 2**31


@dataclass(frozen=True)
class Victims:
    """What one attack faces, and the truth the scorer compares with."""

    observation: Observation
    fed: torch.Tensor  # (slots, C, H, W): what the envoys really fed, slot order
    fed_index: np.ndarray  # (slots,) position of each slot's image among the group's victims


def observe_group(
    deployment: Deployment,
    model: nn.Module,
    threat: str,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    group: int,
    seed: int,
    envoys: int = 1,
) -> Victims:
    """The observation of one group of victims (``envoys`` envoys, equal shares; one envoy
    unless the threat is ``aggregate``) under ``threat``, from their real training."""
    if threat not in THREATS:
        raise ValueError(f"threat must be one of {THREATS}, got {threat!r}")
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    y = torch.from_numpy(np.asarray(labels, np.int64))
    if threat == "gradient":
        obs = observe(
            model,
            x,
            y,
            kl_weight=deployment.recipe.plan.kl_beta,
            generator_seed=victim_seed(seed, group),
        )
        return Victims(obs, x, np.arange(len(y)))
    n = envoys if threat == "aggregate" else 1
    if len(y) % n:
        raise ValueError(f"{len(y)} victims do not split evenly over {n} envoys")
    per = len(y) // n
    program = EnvoyProgram(
        deployment.recipe, images_per_envoy=per, envoys=n, buffers=threat != "update"
    )
    target: dict[str, torch.Tensor] = {}
    fed, fed_index, seeds = [], [], []
    for e in range(n):
        part = slice(e * per, (e + 1) * per)
        s = victim_seed(seed, group * 1000 + e)
        params, buffers = victim_update(model, x[part], labels[part], deployment.recipe, s)
        update = {**params, **(buffers if program.buffers else {})}
        for name, t in update.items():
            target[name] = t / n if name not in target else target[name] + t / n
        batches = fed_batches(model, x[part], labels[part], deployment.recipe, s)
        fed.append(batches.images)
        fed_index.append(batches.index.numpy() + e * per)
        seeds.append(s + 1)
    obs = Observation.of_program(program, target, noise_seeds=seeds, meta={"threat": threat})
    return Victims(obs, torch.cat(fed), np.concatenate(fed_index))


def augmentation_grid(recipe: EnvoyRecipe, *, steps: int = 3) -> torch.Tensor:
    """Affine sampling grids (G, 2, 3) spanning the recipe's augmentation (corners and
    centre of its rotation, scale and shift ranges, with and without the flip), in
    ``augment_batch``'s convention: identification registers each candidate X-ray under
    every one of them, as an attacker who knows the recipe would. Identity only when the
    recipe does not augment."""
    if not recipe.plan.augment:
        return torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    s = recipe.augment_strength
    angles = torch.linspace(-10.0 * s, 10.0 * s, 2 * steps - 1) * (math.pi / 180)
    scales = torch.linspace(1 - 0.10 * s, 1 + 0.10 * s, steps)
    shifts = torch.linspace(-0.08 * s, 0.08 * s, steps) * 2
    flips = (1.0, -1.0) if recipe.flip else (1.0,)
    thetas = []
    for a in angles:
        for sc in scales:
            for f in flips:
                for tx in shifts:
                    for ty in shifts:
                        c, sn = math.cos(a), math.sin(a)
                        sx = sc * f
                        thetas.append([[c / sx, -sn / sc, tx], [sn / sx, c / sc, ty]])
    return torch.tensor(thetas, dtype=torch.float32)
