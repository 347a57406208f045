"""`fedbus attack`: gradient inversion against the deployed model and the real envoy update.

By default it attacks what the federation deploys (:mod:`node.attack.deployed`): the model
and the round-1 training plan of ``configs/director.toml`` (``--config``), the update each
victim envoy makes with its own ``train_local``, seen by a director without secure
aggregation (``--threat update``). Victims come from the PneumoniaMNIST test split (or a
Kermany-layout folder), ``--envoy-images`` per victim envoy; the reported victims and the
ones hyper-parameters were tuned on (``--victims tune``) are disjoint halves of the split.

Each reconstruction is scored against the image the envoy really fed (augmented): PSNR and
SSIM next to the dataset-mean baseline, and identification: the rank of the true X-ray among
all candidates (the 624 test images) by MSE and by normalised cross-correlation, each
candidate registered over the recipe's augmentation range; top-1 and top-5 rates and the
median rank, each with what chance gives. Labels recovered count too. Writes
OUT/grid.png, OUT/reconstruction.gif and OUT/results.json.

The attacker knows everything but the secrets: the architecture, the weights it sent, the
plan, the recipe, the normalisation constants; not the envoy's shuffle, augmentation or
bottleneck noise (the envoy's secrets, seeded from the OS CSPRNG every round:
node.training.seeds), except ``--attack oracle``, the upper bound handed the noise. The stress test of the literature, not a deployed setting, is
``--threat gradient --norm group --defense none``: one image's gradient on the untrained
group-norm sibling, where Inverting Gradients must (and does) work.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

from gradient_leakage.attacks import AttackProgress, GradientAttack, build_attack
from gradient_leakage.bottleneck import bottleneck_snr_db
from gradient_leakage.contrast import ContrastPrior
from gradient_leakage.figures import save_animation, save_grid
from gradient_leakage.metrics import (
    METRICS,
    baseline_psnr,
    binomial_tail,
    chance_rank_probability,
    distance_matrix,
    label_accuracy,
    match_reconstructions,
    mse,
    psnr,
    rank_of_truth,
    ssim,
)
from node.attack.deployed import (
    DEPLOYED_THREATS,
    THREATS,
    Deployment,
    Victims,
    augmentation_grid,
    load_deployment,
    observe_group,
)
from node.errors import ExitCode, FedbusError
from node.progress import progress_display
from node.training.privacy import DPConfig, PrivacyError, check_model
from protocol.configfile import ConfigError

log = structlog.get_logger(__name__)

DEFENSES = ("none", "cvb", "precode")
ATTACK_NAMES = ("ig", "adaptive", "eot", "joint", "two-stage", "oracle", "dlg", "idlg")
IG_FAMILY = ("ig", "adaptive", "eot", "joint", "two-stage", "oracle")
CONTRAST_PRIORS = ("neighbours", "population")
VICTIM_SETS = ("report", "tune")
# Reference X-rays that vote on a reconstruction's contrast. Given the true shapes of the
# PneumoniaMNIST test images, 10 neighbours' vote puts them back at 40.3 dB on average, the
# population RMS at 34.2 dB; on 8 IG reconstructions 30.9 dB against 28.5 dB.
CONTRAST_NEIGHBOURS = 10
# Iterations the command runs when --iterations is not given. Inverting Gradients on 28 x 28
# X-rays (group-norm CNN, one gradient, 4 victims, exact ReLU): 1500 signed-Adam steps 22.9
# dB, 3000 steps 23.4 dB (the paper's 24k is for 32-224 px colour images). DLG and iDLG keep
# their papers' 300 L-BFGS steps.
DEFAULT_ITERATIONS = {name: 3000 for name in IG_FAMILY} | {"dlg": 300, "idlg": 300}
SMOOTH_RELU = 30.0
CHANCE_ALPHA = 0.05
TOP_K = (1, 5)
# The test split is cut once, by this fixed permutation, into a half hyper-parameters may be
# tuned on and a half results are reported on.
VICTIM_SPLIT_SEED = 20_240_614


@dataclass
class AttackConfig:
    attack: str = "ig"
    threat: str = "update"
    images: int = 48
    envoy_images: int = 8
    envoys: int = 5
    batch: int = 1  # --threat gradient: images per gradient
    config: str | None = None  # the director config (default configs/director.toml)
    defense: str | None = None  # None: the config's [model]
    norm: str | None = None
    arch: str | None = None
    kl_beta: float | None = None  # None: the config's [train] kl_beta
    # DP-SGD on the victims (noise multiplier, per-record clip); None: the plain recipe
    dp_noise: float | None = None
    dp_clip: float = 1.0
    trained: str | None = None
    round: int | None = None
    victims: str = "report"
    out: str = "runs/attack"
    data: str | None = None
    source: str = "pneumoniamnist"
    seed: int = 0
    iterations: int | None = None
    restarts: int = 1
    tv: float | None = None
    lr: float | None = None
    # IG-family attacks differentiate through Softplus(beta) in place of ReLU; 0 = the exact
    # ReLU; None = SMOOTH_RELU for them (DLG and iDLG keep the exact ReLU). On the group-norm
    # CNN (one gradient, 8 victims, 3000 steps): exact 22.9 dB, beta 10 27.6 dB, beta 30
    # 28.5 dB, beta 50 24.9 dB (benchmarks/leakage/README.md).
    smooth_relu: float | None = None
    bottleneck: str | None = None  # None: the attack's own (mean path for IG)
    contrast_prior: str = "neighbours"
    workers: int = 1
    frames: int = 40
    quiet: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.attack not in ATTACK_NAMES:
            raise ValueError(f"--attack must be one of {ATTACK_NAMES}, got {self.attack!r}")
        if self.threat not in THREATS:
            raise ValueError(f"--threat must be one of {THREATS}, got {self.threat!r}")
        if self.defense is not None and self.defense not in DEFENSES:
            raise ValueError(f"--defense must be one of {DEFENSES}, got {self.defense!r}")
        if self.norm is not None and self.norm not in ("batch", "group", "none"):
            raise ValueError(f"--norm must be batch, group or none, got {self.norm!r}")
        if min(self.images, self.batch, self.envoys, self.workers, self.envoy_images) < 1:
            raise ValueError(
                "--images, --envoy-images, --batch, --envoys and --workers must be >= 1"
            )
        if self.images % self.victims_per_attack:
            raise ValueError(
                f"--images {self.images} must be a multiple of the victims per attack "
                f"({self.victims_per_attack}: {self._per_attack_reason})"
            )
        if self.iterations is not None and self.iterations < 1:
            raise ValueError(f"--iterations must be >= 1, got {self.iterations}")
        if self.restarts < 1:
            raise ValueError(f"--restarts must be >= 1, got {self.restarts}")
        if self.smooth_relu is not None:
            if self.smooth_relu < 0:
                raise ValueError(f"--smooth-relu must be >= 0 (0: exact), got {self.smooth_relu}")
            if self.smooth_relu > 0 and self.attack not in IG_FAMILY:
                raise ValueError(f"--smooth-relu applies to --attack {', '.join(IG_FAMILY)}")
        ig_only = [k for k in self.extra if k not in ("parameters",)]
        if ("parameters" in self.extra or ig_only) and self.attack not in IG_FAMILY:
            names = ", ".join(f"--{k.replace('_', '-')}" for k in self.extra)
            raise ValueError(f"{names} apply to --attack {', '.join(IG_FAMILY)} only")
        if self.source not in ("pneumoniamnist", "kermany"):
            raise ValueError(f"--source must be pneumoniamnist or kermany, got {self.source!r}")
        if self.contrast_prior not in CONTRAST_PRIORS:
            raise ValueError(
                f"--contrast-prior must be one of {CONTRAST_PRIORS}, got {self.contrast_prior!r}"
            )
        if self.victims not in VICTIM_SETS:
            raise ValueError(f"--victims must be one of {VICTIM_SETS}, got {self.victims!r}")
        if self.bottleneck not in (None, "mean", "sample"):
            raise ValueError(f"--bottleneck must be mean or sample, got {self.bottleneck!r}")

    @property
    def victims_per_attack(self) -> int:
        if self.threat == "gradient":
            return self.batch
        return self.envoy_images * (self.envoys if self.threat == "aggregate" else 1)

    @property
    def _per_attack_reason(self) -> str:
        if self.threat == "gradient":
            return "--batch"
        if self.threat == "aggregate":
            return "--envoy-images x --envoys"
        return "--envoy-images"

    @property
    def effective_smooth_relu(self) -> float:
        """Softplus sharpness the attack optimises through; 0 for the exact ReLU."""
        if self.smooth_relu is not None:
            return self.smooth_relu
        return SMOOTH_RELU if self.attack in IG_FAMILY else 0.0

    @property
    def effective_iterations(self) -> int:
        return self.iterations or DEFAULT_ITERATIONS[self.attack]


def contrast_blind(deployment: Deployment, cfg: AttackConfig) -> bool:
    """Whether no update can tell one image's contrast: a bias-free conv1 followed by a
    per-image normalisation (group norm; batch norm over a batch of one) and nothing
    between them that sees the scale (CVB's noise does: its sigma does not scale)."""
    if deployment.defense == "cvb":
        return False
    if deployment.norm == "group":
        return True
    return deployment.norm == "batch" and cfg.threat == "gradient" and cfg.batch == 1


@dataclass
class Data:
    victims: np.ndarray  # float32 (N, 1, H, W) in [0, 1]
    labels: np.ndarray  # int64 (N,)
    indices: np.ndarray  # victims' indices in the candidate pool
    candidates: np.ndarray  # float32 (M, 1, H, W): the pool for identification
    mean_image: np.ndarray  # float32 (1, 1, H, W): training-set mean
    references: np.ndarray  # float32 (M, 1, H, W): the attacker's public images, no victim
    source: str


def victim_pool(size: int, which: str) -> np.ndarray:
    """The half of a split's indices that victims of ``which`` set are drawn from."""
    perm = np.random.default_rng(VICTIM_SPLIT_SEED).permutation(size)
    half = perm[: size // 2] if which == "tune" else perm[size // 2 :]
    return np.sort(half)


def load_data(cfg: AttackConfig) -> Data:
    """Victims, the identification pool and the training-mean image, chosen by ``cfg.seed``."""
    from node.training.data import load_image_folder, load_pneumoniamnist

    if cfg.source == "pneumoniamnist":
        ds = load_pneumoniamnist(cfg.data)
        pool_u8, pool_labels = ds.test.images, ds.test.labels
        mean = ds.train.images.astype(np.float32).mean(axis=0) / 255.0
        references_u8 = ds.train.images
        source = "PneumoniaMNIST test split"
    else:
        if cfg.data is None:
            raise ValueError("--source kermany needs --data PATH (a chest_xray-style folder)")
        split = load_image_folder(cfg.data, 28)
        pool_u8, pool_labels = split.images, split.labels
        mean = pool_u8.astype(np.float32).mean(axis=0) / 255.0
        source = f"image folder {cfg.data}"
    allowed = victim_pool(len(pool_u8), cfg.victims)
    if cfg.images > len(allowed):
        raise ValueError(
            f"--images {cfg.images} exceeds the {len(allowed)} images of the {source} that "
            f"--victims {cfg.victims} draws from (half the split)"
        )
    rng = np.random.default_rng(cfg.seed)
    indices = rng.choice(allowed, size=cfg.images, replace=False)
    pool = (pool_u8.astype(np.float32) / 255.0)[:, None]
    if cfg.source != "pneumoniamnist":  # one folder: the attacker's references are the rest
        references_u8 = np.delete(pool_u8, indices, axis=0)
    return Data(
        victims=pool[indices],
        labels=pool_labels[indices].astype(np.int64),
        indices=indices,
        candidates=pool,
        mean_image=mean[None, None].astype(np.float32),
        references=(references_u8.astype(np.float32) / 255.0)[:, None],
        source=source,
    )


def deployment_of(cfg: AttackConfig) -> Deployment:
    return load_deployment(
        cfg.config,
        trained=cfg.trained,
        round=cfg.round,
        defense=cfg.defense,
        norm=cfg.norm,
        arch=cfg.arch,
        kl_beta=cfg.kl_beta,
        privacy=None
        if cfg.dp_noise is None
        else DPConfig(noise_multiplier=cfg.dp_noise, max_grad_norm=cfg.dp_clip, sample_rate=1.0),
    )


def make_attack(cfg: AttackConfig, deployment: Deployment) -> GradientAttack:
    from node.training.model import PIXEL_MEAN, PIXEL_STD

    options: dict[str, Any] = {
        "iterations": cfg.effective_iterations,
        "restarts": cfg.restarts,
        "contrast": (PIXEL_MEAN, PIXEL_STD) if contrast_blind(deployment, cfg) else None,
    }
    if cfg.bottleneck is not None:
        options["bottleneck"] = cfg.bottleneck
    if cfg.attack in IG_FAMILY:
        options.update(
            tv_weight=0.1 if cfg.tv is None else cfg.tv,
            # Pixel-space step. On the group-norm CNN (4 victims): 0.03 gave 20.6 dB at 600
            # steps; at 1500 steps 0.1 gave 22.9 dB and 0.3 gave 23.0 dB, and a TV weight
            # of 0.03 (step 0.03) 21.3 dB (benchmarks/leakage/README.md, "Tuning").
            lr=0.1 if cfg.lr is None else cfg.lr,
            init="rand",
            box=(0.0, 1.0),
            smooth_relu=cfg.effective_smooth_relu or None,
        )
    elif cfg.lr is not None:
        options["lr"] = cfg.lr
    options.update(cfg.extra)
    return build_attack(cfg.attack, **options)


def attack_groups(
    cfg: AttackConfig,
    xs: Sequence[np.ndarray],
    ys: Sequence[np.ndarray],
    groups: Sequence[int],
    progress: Callable[[AttackProgress], None] | None = None,
) -> list[dict[str, Any]]:
    """Let each victim group train and send its update, attack them all (one batched run
    where the attack supports it); returns plain arrays, so it also runs in a worker."""
    torch.set_num_threads(1)
    deployment = deployment_of(cfg)
    model = deployment.build_model()
    victims: list[Victims] = [
        observe_group(
            deployment, model, cfg.threat, x, y, group=g, seed=cfg.seed, envoys=cfg.envoys
        )
        for x, y, g in zip(xs, ys, groups, strict=True)
    ]
    attack = make_attack(cfg, deployment)
    every = max(1, cfg.effective_iterations // max(1, cfg.frames))
    slots = victims[0].observation.num_images
    snapshots: dict[tuple[int, int], list[np.ndarray]] = {}

    def on_progress(p: AttackProgress) -> None:
        imgs = p.images.numpy()
        for j, v in enumerate(p.victims):
            snapshots.setdefault((p.trial, v), []).append(imgs[j * slots : (j + 1) * slots])
        if progress is not None:
            progress(p)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed * 7919 + groups[0])  # the attacker's own noise draws
        results = attack.reconstruct_many(
            model,
            [v.observation for v in victims],
            tuple(xs[0].shape[1:]),
            progress=on_progress,
            progress_every=every,
            seeds=[cfg.seed * 7919 + g for g in groups],
        )
    out = []
    for v, (res, vic) in enumerate(zip(results, victims, strict=True)):
        best_trial = _best_trial(res.trial_losses)
        out.append(
            {
                "images": res.images.numpy(),
                "labels": res.labels.numpy(),
                "loss": res.loss,
                "trial_losses": res.trial_losses,
                "frames": snapshots.get((best_trial, v), []),
                "matched_parameters": res.matched_parameters,
                "fed": vic.fed.numpy(),
                "fed_index": vic.fed_index,
                "snr_db": _snr(model, vic.fed),
            }
        )
    return out


def _snr(model: torch.nn.Module, fed: torch.Tensor) -> float:
    """The bottleneck's SNR on the fed images in training mode (NaN without one)."""
    was = model.training
    model.train()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(fed)
        return bottleneck_snr_db(model)
    finally:
        model.train(was)


def _best_trial(losses: Sequence[float]) -> int:
    """The restart with the lowest final objective; the first when none is finite (an
    L-BFGS run that diverged on every restart still returns its last finite iterate)."""
    arr = np.asarray(losses, dtype=float)
    return (
        int(np.nanargmin(np.where(np.isfinite(arr), arr, np.nan))) if np.isfinite(arr).any() else 0
    )


def _worker(
    args: tuple[AttackConfig, list[np.ndarray], list[np.ndarray], list[int]],
) -> list[dict[str, Any]]:
    cfg, xs, ys, groups = args
    return attack_groups(cfg, xs, ys, groups)


def cpu_seconds() -> float:
    """User and system CPU seconds of this process and its finished child processes."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run(cfg: AttackConfig) -> dict[str, Any]:
    """Run the whole experiment and write its files; returns the results dict."""
    cfg.validate()
    started = time.monotonic()
    cpu_started = cpu_seconds()
    deployment = deployment_of(cfg)  # fail on a bad config before any work
    if deployment.recipe.privacy is not None:
        check_model(deployment.build_model())  # DP refuses batch norm: say so now
    data = load_data(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    per = cfg.victims_per_attack
    xs = [data.victims[i : i + per] for i in range(0, cfg.images, per)]
    ys = [data.labels[i : i + per] for i in range(0, cfg.images, per)]
    iterations = cfg.effective_iterations
    bar = progress_display(
        iterations * cfg.restarts, desc=f"{cfg.attack} vs {deployment.defense}", quiet=cfg.quiet
    )
    workers = min(cfg.workers, len(xs))
    if workers == 1:
        done = [0]

        def tick(p: AttackProgress) -> None:
            # The bar counts one victim's iterations; a batched attack reports all victims
            # at once, a sequential one victim after victim (each a 1/len(xs) share).
            per_victim = iterations * cfg.restarts
            within = p.trial * iterations + p.iteration
            if len(p.victims) < len(xs):
                within = (p.victims[0] * per_victim + within) // len(xs)
            bar.update(within - done[0])
            done[0] = within
            bar.set_status(f"loss={p.loss:.4f}")

        results = attack_groups(cfg, xs, ys, list(range(len(xs))), tick)
        bar.update(iterations * cfg.restarts - done[0])
    else:
        chunks = [list(range(w, len(xs), workers)) for w in range(workers)]
        jobs = [(cfg, [xs[g] for g in c], [ys[g] for g in c], c) for c in chunks]
        results_by_group: dict[int, dict[str, Any]] = {}
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            for chunk, res in zip(chunks, pool.map(_worker, jobs), strict=True):
                results_by_group.update(zip(chunk, res, strict=True))
                bar.update(iterations * cfg.restarts * len(chunk) // len(xs))
        results = [results_by_group[g] for g in range(len(xs))]
    bar.close()
    if contrast_blind(deployment, cfg) and cfg.contrast_prior == "neighbours":
        choose_contrast(results, data)
    report = score(cfg, deployment, data, results, time.monotonic() - started)
    # CPU seconds of this attack, this process and its workers: on a shared machine the wall
    # time says more about the neighbours than about the attack. Differences, because a
    # process that runs several attacks (benchmarks/leakage/run.py) accumulates them all.
    report["summary"]["cpu_seconds"] = cpu_seconds() - cpu_started
    write_outputs(out, cfg, deployment, report, results)
    return report


def choose_contrast(results: list[dict[str, Any]], data: Data) -> None:
    """Give each reconstruction the contrast of its nearest reference X-rays, in place.

    Every update is the same along the ray ``PIXEL_MEAN + a * (x - PIXEL_MEAN)``, so this
    changes no attack objective, only which point of the ray the attacker reports."""
    from node.training.model import PIXEL_MEAN

    references = torch.from_numpy(data.references)
    with_contrast = int(((references - PIXEL_MEAN).flatten(1).abs().amax(dim=1) > 0).sum())
    if with_contrast == 0:
        log.warning("attack.contrast_prior_skipped", reason="no reference image besides victims")
        return
    prior = ContrastPrior(references, PIXEL_MEAN, k=min(CONTRAST_NEIGHBOURS, with_contrast))
    for res in results:
        res["images"] = prior.apply(torch.from_numpy(res["images"])).numpy()


def matched(res: dict[str, Any]) -> torch.Tensor:
    """The group's reconstructions reordered to its fed slots (minimum total MSE): the
    update does not say which dummy became which image."""
    rec = torch.from_numpy(res["images"]).clamp(0, 1)
    return rec[match_reconstructions(rec, torch.from_numpy(res["fed"]))]


def score(
    cfg: AttackConfig,
    deployment: Deployment,
    data: Data,
    results: list[dict[str, Any]],
    seconds: float,
) -> dict[str, Any]:
    per = cfg.victims_per_attack
    candidates = torch.from_numpy(data.candidates)
    mean_image = torch.from_numpy(data.mean_image)
    transforms = augmentation_grid(deployment.recipe) if cfg.threat in DEPLOYED_THREATS else None
    images: list[dict[str, Any]] = []
    label_acc: list[float] = []
    for g, res in enumerate(results):
        rec = matched(res)
        fed = torch.from_numpy(res["fed"])
        slot_of = res["fed_index"]  # slot -> victim position within the group
        p, s, e = psnr(rec, fed), ssim(rec, fed), mse(rec, fed)
        base = baseline_psnr(mean_image, fed)
        truth = torch.from_numpy(data.indices[g * per : (g + 1) * per])
        # Every reconstruction of the group is a guess at every victim of the group: a
        # victim's rank is its best over them (chance accounts for the tries).
        ranks = {}
        nearest = {}
        for metric in METRICS:
            dist = distance_matrix(rec, candidates, metric, transforms=transforms)
            per_rec = torch.stack(
                [rank_of_truth(dist, truth[v].expand(len(rec))) for v in range(per)]
            )
            ranks[metric] = per_rec.min(dim=1).values
            nearest[metric] = dist.argmin(dim=1)
        true_labels = data.labels[g * per : (g + 1) * per]
        label_acc.append(label_accuracy(res["labels"], true_labels[slot_of]))
        for v in range(per):
            slots = np.flatnonzero(slot_of == v)
            best = int(slots[int(torch.argmax(p[slots]))])
            images.append(
                {
                    "index": int(data.indices[g * per + v]),
                    "label": int(true_labels[v]),
                    "group": g,
                    "mse": float(e[best]),
                    "psnr": float(p[best]),
                    "ssim": float(s[best]),
                    "baseline_psnr": float(base[best]),
                    "rank_mse": int(ranks["mse"][v]),
                    "rank_ncc": int(ranks["ncc"][v]),
                    "nearest_mse": int(nearest["mse"][best]),
                    "nearest_ncc": int(nearest["ncc"][best]),
                    "identified": bool(ranks["mse"][v] == 1),
                }
            )
    tries = results[0]["fed"].shape[0] if results else 1
    summary = _summary(cfg, images, len(data.candidates), tries)
    summary.update(
        label_accuracy=float(np.mean(label_acc)),
        seconds=seconds,
        iterations=cfg.effective_iterations,
        restarts=cfg.restarts,
        smooth_relu=cfg.effective_smooth_relu,
        matched_parameters=results[0]["matched_parameters"] if results else [],
        bottleneck_snr_db=float(np.mean([r["snr_db"] for r in results])) if results else math.nan,
        registration_poses=0 if transforms is None else int(transforms.shape[0]),
    )
    config = {k: v for k, v in asdict(cfg).items() if k not in ("quiet",)}
    config["pool"] = data.source
    config["deployment"] = {
        "config": deployment.config_path,
        "model": deployment.model_kwargs,
        "round": deployment.round,
        "weights": deployment.weights_source,
        "plan": {
            f: getattr(deployment.recipe.plan, f) for f in deployment.recipe.plan.__struct_fields__
        },
        "recipe": {k: v for k, v in asdict(deployment.recipe).items() if k != "plan"},
    }
    config["decision_rule"] = (
        f"a victim's rank is that of its true image among the {len(data.candidates)} "
        f"candidates for the best of its group's {tries} reconstructions; by chance "
        f"P(rank <= k) = 1 - (1 - k/{len(data.candidates)})^{tries}; identification is at "
        f"chance when the one-sided binomial p-value of the observed top-k count is >= "
        f"{CHANCE_ALPHA}"
    )
    return {"config": config, "images": images, "summary": summary}


def _summary(
    cfg: AttackConfig, images: list[dict[str, Any]], candidates: int, tries: int
) -> dict[str, Any]:
    n = len(images)
    p = np.array([im["psnr"] for im in images])
    out: dict[str, Any] = {
        "images": n,
        "candidates": candidates,
        "tries_per_victim": tries,
        "psnr": float(p.mean()),
        "psnr_median": float(np.median(p)),
        "ssim": float(np.mean([im["ssim"] for im in images])),
        "mse": float(np.mean([im["mse"] for im in images])),
        "baseline_psnr": float(np.mean([im["baseline_psnr"] for im in images])),
    }
    out["below_baseline"] = out["psnr"] < out["baseline_psnr"]
    at_chance = True
    for metric in METRICS:
        ranks = np.array([im[f"rank_{metric}"] for im in images])
        out[f"median_rank_{metric}"] = float(np.median(ranks))
        for k in TOP_K:
            hits = int((ranks <= k).sum())
            chance = chance_rank_probability(k, candidates, tries)
            pval = binomial_tail(hits, n, chance)
            out[f"top{k}_{metric}"] = hits / n
            out[f"top{k}_{metric}_count"] = hits
            out[f"top{k}_{metric}_chance"] = chance
            out[f"top{k}_{metric}_p_value"] = pval
            at_chance = at_chance and pval >= CHANCE_ALPHA
    out["median_rank_chance"] = _median_rank_by_chance(candidates, tries)
    out["at_chance"] = at_chance
    # The headline identification (top-1 by MSE), under the names earlier reports used.
    out["identified_count"] = out["top1_mse_count"]
    out["identified"] = out["top1_mse"]
    out["chance"] = out["top1_mse_chance"]
    out["chance_p_value"] = out["top1_mse_p_value"]
    return out


def _median_rank_by_chance(candidates: int, tries: int) -> float:
    """The median of the best of ``tries`` uniform ranks among ``candidates``."""
    return float(candidates * (1 - 0.5 ** (1 / tries)))


def write_outputs(
    out: Path,
    cfg: AttackConfig,
    deployment: Deployment,
    report: dict[str, Any],
    results: list[dict[str, Any]],
) -> None:
    from broker.files import atomic_write_text

    recs = torch.cat([matched(r) for r in results])
    fed = torch.cat([torch.from_numpy(r["fed"]) for r in results])
    summ = report["summary"]
    title = (
        f"{cfg.attack} vs {deployment.defense} ({cfg.threat}, round {deployment.round}): "
        f"PSNR {summ['psnr']:.1f} dB (baseline {summ['baseline_psnr']:.1f}), top-1 "
        f"{summ['top1_mse_count']}/{summ['images']}, median rank {summ['median_rank_mse']:.0f}"
    )
    p, s = psnr(recs, fed), ssim(recs, fed)
    save_grid(out / "grid.png", fed, recs, psnr=p.tolist(), ssim=s.tolist(), title=title)
    n_frames = min((len(r["frames"]) for r in results), default=0)
    if n_frames:
        frames = []
        for f in range(n_frames):
            frame = []
            for r in results:
                rec = torch.from_numpy(r["frames"][f]).clamp(0, 1)
                order = match_reconstructions(
                    torch.from_numpy(r["images"]), torch.from_numpy(r["fed"])
                )
                frame.append(rec[order])
            frames.append(torch.cat(frame))
        save_animation(out / "reconstruction.gif", frames, fed)
    atomic_write_text(out / "results.json", json.dumps(report, indent=2) + "\n")


def parse_args(argv: Sequence[str] | None) -> AttackConfig:
    ap = argparse.ArgumentParser(
        prog="fedbus attack",
        description="Gradient-inversion attack on the deployed model and the real envoy "
        "update: reconstruct victims' X-rays and score the reconstructions.",
    )
    ap.add_argument(
        "--attack",
        choices=ATTACK_NAMES,
        default="ig",
        help="ig: Inverting Gradients; adaptive: match conv1 only, before the bottleneck; "
        "eot: expectation over noise draws; joint: image and noise together; two-stage: "
        "latent, then conv1 by least squares; oracle: handed the victims' exact bottleneck "
        "noise, an upper bound only: the envoy seeds that noise from the OS CSPRNG every "
        "round and never sends it (node.training.seeds), so no real attacker has it; dlg, "
        "idlg: the classics",
    )
    ap.add_argument(
        "--threat",
        choices=THREATS,
        default="update",
        help="update: one envoy's update (no secure aggregation, the worst case); "
        "update+bn: with its batch-norm statistics; aggregate: the secure aggregate of "
        "--envoys envoys; gradient: one batch's gradient (the stress test)",
    )
    ap.add_argument("--images", type=int, default=48, help="victims in all (default 48)")
    ap.add_argument(
        "--envoy-images",
        type=int,
        default=8,
        help="images each victim envoy trains on: one local step of 8 by default (with "
        "batch norm one image is no worst case: per-image normalisation defeats every attack)",
    )
    ap.add_argument("--envoys", type=int, default=5, help="envoys in a secure aggregate")
    ap.add_argument("--batch", type=int, default=1, help="--threat gradient: images per gradient")
    ap.add_argument(
        "--config", default=None, help="director config (default configs/director.toml)"
    )
    ap.add_argument("--defense", choices=DEFENSES, default=None, help="default: the config's")
    ap.add_argument("--norm", choices=("batch", "group", "none"), default=None)
    ap.add_argument("--arch", choices=("cnn", "resnet18"), default=None)
    ap.add_argument(
        "--kl-beta", type=float, default=None, help="override the config's [train] kl_beta"
    )
    ap.add_argument("--trained", default=None, help="weights: a director state folder or an .npz")
    ap.add_argument("--round", type=int, default=None, help="attacked round (its learning rate)")
    ap.add_argument(
        "--dp-noise",
        type=float,
        default=None,
        metavar="SIGMA",
        help="victims train with DP-SGD at this noise multiplier (every record in the one "
        "step; needs --norm group)",
    )
    ap.add_argument("--dp-clip", type=float, default=1.0, help="DP-SGD per-record clip norm")
    ap.add_argument("--victims", choices=VICTIM_SETS, default="report")
    ap.add_argument("--out", default=None, help="output folder (default runs/attack-ATTACK)")
    ap.add_argument("--data", default=None, help="PneumoniaMNIST npz/folder, or a Kermany folder")
    ap.add_argument("--source", choices=("pneumoniamnist", "kermany"), default="pneumoniamnist")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iterations", type=int, default=None, help="attack iterations per restart")
    ap.add_argument("--restarts", type=int, default=1)
    ap.add_argument("--tv", type=float, default=None, help="total-variation weight (IG family)")
    ap.add_argument("--lr", type=float, default=None, help="attack step size")
    ap.add_argument(
        "--smooth-relu",
        type=float,
        default=None,
        metavar="BETA",
        help=f"IG family: optimise through Softplus(BETA) in place of ReLU (default "
        f"{SMOOTH_RELU:g}; 0 = the exact ReLU, as in the papers)",
    )
    ap.add_argument("--bottleneck", choices=("mean", "sample"), default=None)
    ap.add_argument(
        "--contrast-prior",
        choices=CONTRAST_PRIORS,
        default="neighbours",
        help="on a contrast-blind model: the contrast of the nearest training X-rays "
        "(default) or the population's pixel RMS",
    )
    ap.add_argument("--workers", type=int, default=1, help="attack processes in parallel")
    ap.add_argument(
        "--parameters",
        default=None,
        help="comma list of parameter names whose updates the attack matches",
    )
    ap.add_argument("--eot-samples", type=int, default=None, help="--attack eot: noise draws")
    ap.add_argument("--noise-weight", type=float, default=None, help="--attack joint: prior weight")
    ap.add_argument(
        "--buffer-weight", type=float, default=None, help="weight of the running statistics"
    )
    ap.add_argument("--labels", choices=("auto", "infer", "joint"), default=None)
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    extra: dict[str, Any] = {}
    if a.parameters:
        extra["parameters"] = a.parameters.split(",")
    for key, value in (
        ("samples", a.eot_samples),
        ("noise_weight", a.noise_weight),
        ("buffer_weight", a.buffer_weight),
        ("label_mode", a.labels),
    ):
        if value is not None:
            extra[key] = value
    return AttackConfig(
        attack=a.attack,
        threat=a.threat,
        images=a.images,
        envoy_images=a.envoy_images,
        envoys=a.envoys,
        batch=a.batch,
        config=a.config,
        defense=a.defense,
        norm=a.norm,
        arch=a.arch,
        kl_beta=a.kl_beta,
        dp_noise=a.dp_noise,
        dp_clip=a.dp_clip,
        trained=a.trained,
        round=a.round,
        victims=a.victims,
        out=a.out or f"runs/attack-{a.attack}",
        data=a.data,
        source=a.source,
        seed=a.seed,
        iterations=a.iterations,
        restarts=a.restarts,
        tv=a.tv,
        lr=a.lr,
        smooth_relu=a.smooth_relu,
        bottleneck=a.bottleneck,
        contrast_prior=a.contrast_prior,
        workers=a.workers,
        quiet=a.quiet,
        extra=extra,
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        report = run(cfg)
    except PrivacyError as exc:  # --dp-noise against a model DP cannot train: the options'
        print(f"fedbus attack: {exc}", file=sys.stderr)
        return int(ExitCode.USAGE)
    except (FedbusError, ConfigError) as exc:  # missing data, an unusable director config
        print(f"fedbus attack: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", ExitCode.CONFIG))
    except (ValueError, FileNotFoundError) as exc:
        print(f"fedbus attack: {exc}", file=sys.stderr)
        return int(ExitCode.USAGE)
    s = report["summary"]
    defense = report["config"]["deployment"]["model"]["defense"]
    print(
        f"{cfg.attack} vs {defense} ({cfg.threat}): PSNR {s['psnr']:.2f} dB (baseline "
        f"{s['baseline_psnr']:.2f}), SSIM {s['ssim']:.3f}, top-1 MSE {s['top1_mse_count']}/"
        f"{s['images']} NCC {s['top1_ncc_count']}/{s['images']}, top-5 MSE "
        f"{s['top5_mse_count']}/{s['images']}, median rank MSE {s['median_rank_mse']:.0f} "
        f"NCC {s['median_rank_ncc']:.0f} (chance {s['median_rank_chance']:.0f}), "
        f"{'at chance' if s['at_chance'] else 'ABOVE chance'}, labels "
        f"{100 * s['label_accuracy']:.0f}%, {s['seconds']:.0f} s -> {cfg.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
