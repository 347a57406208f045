"""`fedbus attack`: gradient inversion against the federation's model, with and without defence.

Picks victims from the PneumoniaMNIST test split (or a Kermany-layout folder), lets each
victim compute the update the protocol would send (the model in training mode, so a
variational bottleneck draws its noise), runs one attack on it, and scores the
reconstruction: PSNR / SSIM, whether the victim is the nearest neighbour of the
reconstruction among all candidate images (identification), and the label recovered. Writes
OUT/grid.png, OUT/reconstruction.gif and OUT/results.json.

The attacker is an honest-but-curious director: it knows the architecture, the weights it
sent, the training plan, and the model's input normalisation constants. The last matters
here: a bias-free first convolution followed by GroupNorm makes the model's output, and so
every gradient, exactly invariant to the image's contrast around the normalisation mean,
so no gradient can tell contrast. Attacks optimise with that gauge fixed at the known pixel
statistics (`contrast` in :mod:`gradient_leakage.attacks`); the reconstruction then gets the
contrast of the training X-rays whose shapes are nearest to it
(:class:`gradient_leakage.contrast.ContrastPrior`, ``--contrast-prior neighbours``): the
attacker's prior from public data, never the victims.
"""

from __future__ import annotations

import argparse
import json
import os
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

from gradient_leakage.attacks import AttackProgress, build_attack
from gradient_leakage.contrast import ContrastPrior
from gradient_leakage.figures import save_animation, save_grid
from gradient_leakage.metrics import (
    baseline_psnr,
    chance_p_value,
    identify,
    label_accuracy,
    match_reconstructions,
    mse,
    psnr,
    ssim,
)
from gradient_leakage.metrics import (
    identified as is_identified,
)
from gradient_leakage.observation import observe
from node.errors import ExitCode, FedbusError
from node.progress import progress_display

log = structlog.get_logger(__name__)

DEFENSES = ("none", "cvb", "precode")
ATTACK_NAMES = ("ig", "dlg", "idlg", "adaptive")
THREATS = ("single", "fedavg", "aggregate")
CONTRAST_PRIORS = ("neighbours", "population")
# Reference X-rays that vote on a reconstruction's contrast. Given the true shapes of the
# PneumoniaMNIST test images, 10 neighbours' vote puts them back at 40.3 dB on average, the
# population RMS at 34.2 dB; on 8 IG reconstructions 30.9 dB against 28.5 dB.
CONTRAST_NEIGHBOURS = 10
# Iterations the command runs when --iterations is not given. Inverting Gradients on 28 x 28
# X-rays (group-norm CNN, 4 victims, exact ReLU, benchmarks/leakage): 1500 signed-Adam steps
# 22.9 dB, 3000 steps 23.4 dB (the paper's 24k is for 32-224 px colour images, and 16 victims at
# 3000 steps already take about 10 minutes on 2 cores). DLG and iDLG keep their papers'
# 300 L-BFGS steps.
DEFAULT_ITERATIONS = {"ig": 3000, "adaptive": 3000, "dlg": 300, "idlg": 300}
SMOOTH_RELU = 30.0
CHANCE_ALPHA = 0.05


@dataclass
class AttackConfig:
    defense: str = "none"
    attack: str = "ig"
    images: int = 16
    out: str = "runs/attack"
    data: str | None = None
    source: str = "pneumoniamnist"
    trained: str | None = None
    seed: int = 0
    iterations: int | None = None
    restarts: int = 1
    threat: str = "single"
    batch: int = 1
    envoys: int = 4
    local_steps: int = 4
    local_lr: float = 0.05
    local_batch: int | None = None
    kl_beta: float = 0.0
    tv: float | None = None
    lr: float | None = None
    # IG and the adaptive attack differentiate through Softplus(beta) in place of ReLU; 0 =
    # the exact ReLU; None = SMOOTH_RELU for those two (DLG and iDLG keep the exact ReLU).
    # On the group-norm CNN (8 victims, 3000 steps): exact 22.9 dB, beta 10 27.6 dB, beta 30
    # 28.5 dB, beta 50 24.9 dB (benchmarks/leakage/README.md, "What made Inverting Gradients
    # work").
    smooth_relu: float | None = None
    arch: str = "cnn"
    # Group norm, not the federation's batch norm: batch norm over one image normalises each
    # channel on its own and makes the update hypersensitive to sub-grey-level pixel noise
    # (tests/gradient_leakage/test_leakage_batchnorm.py), so every optimisation attack here
    # fails on it even without a defence (12 dB). A defence measured on a model no attack
    # can invert proves nothing, so the attacks run on the group-norm variant by default.
    norm: str = "group"
    bottleneck: str = "mean"
    # How the attacker picks the contrast no gradient can tell (see the module docstring).
    contrast_prior: str = "neighbours"
    workers: int = 1
    frames: int = 40
    quiet: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.defense not in DEFENSES:
            raise ValueError(f"--defense must be one of {DEFENSES}, got {self.defense!r}")
        if self.attack not in ATTACK_NAMES:
            raise ValueError(f"--attack must be one of {ATTACK_NAMES}, got {self.attack!r}")
        if self.threat not in THREATS:
            raise ValueError(f"--threat must be one of {THREATS}, got {self.threat!r}")
        if self.images < 1 or self.batch < 1 or self.envoys < 1 or self.workers < 1:
            raise ValueError("--images, --batch, --envoys and --workers must be >= 1")
        if self.images % self.victims_per_attack:
            raise ValueError(
                f"--images {self.images} must be a multiple of the images per attack "
                f"({self.victims_per_attack} = batch x envoys)"
            )
        if self.iterations is not None and self.iterations < 1:
            raise ValueError(f"--iterations must be >= 1, got {self.iterations}")
        if self.restarts < 1:
            raise ValueError(f"--restarts must be >= 1, got {self.restarts}")
        if self.smooth_relu is not None:
            if self.smooth_relu < 0:
                raise ValueError(f"--smooth-relu must be >= 0 (0: exact), got {self.smooth_relu}")
            if self.smooth_relu > 0 and self.attack not in ("ig", "adaptive"):
                raise ValueError("--smooth-relu applies to --attack ig or adaptive only")
        if "parameters" in self.extra and self.attack not in ("ig", "adaptive"):
            raise ValueError("--parameters applies to --attack ig or adaptive only")
        if self.norm not in ("batch", "group", "none"):
            raise ValueError(f"--norm must be batch, group or none, got {self.norm!r}")
        if self.source not in ("pneumoniamnist", "kermany"):
            raise ValueError(f"--source must be pneumoniamnist or kermany, got {self.source!r}")
        if self.contrast_prior not in CONTRAST_PRIORS:
            raise ValueError(
                f"--contrast-prior must be one of {CONTRAST_PRIORS}, got {self.contrast_prior!r}"
            )

    @property
    def contrast_blind(self) -> bool:
        """Whether the model cannot see contrast: a normalisation right after the bias-free
        first convolution (batch or group norm; without one, conv1 has a bias)."""
        return self.norm != "none"

    @property
    def victims_per_attack(self) -> int:
        return self.batch * (self.envoys if self.threat == "aggregate" else 1)

    @property
    def effective_smooth_relu(self) -> float:
        """Softplus sharpness the attack optimises through; 0 for the exact ReLU."""
        if self.smooth_relu is not None:
            return self.smooth_relu
        return SMOOTH_RELU if self.attack in ("ig", "adaptive") else 0.0

    @property
    def effective_iterations(self) -> int:
        return self.iterations or DEFAULT_ITERATIONS[self.attack]


@dataclass
class Data:
    victims: np.ndarray  # float32 (N, 1, H, W) in [0, 1]
    labels: np.ndarray  # int64 (N,)
    indices: np.ndarray  # victims' indices in the candidate pool
    candidates: np.ndarray  # float32 (M, 1, H, W): the pool for identification
    mean_image: np.ndarray  # float32 (1, 1, H, W): training-set mean
    references: np.ndarray  # float32 (M, 1, H, W): the attacker's public images, no victim
    source: str


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
    if cfg.images > len(pool_u8):
        raise ValueError(f"--images {cfg.images} exceeds the {len(pool_u8)} images of the {source}")
    rng = np.random.default_rng(cfg.seed)
    indices = np.sort(rng.choice(len(pool_u8), size=cfg.images, replace=False))
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


def load_trained_weights(path: str) -> dict[str, np.ndarray]:
    """Weights from an .npz of named arrays or a director checkpoint (its best model)."""
    p = Path(path)
    if p.suffix == ".npz" and p.is_file():
        with np.load(p, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    from node.checkpoint import CHECKPOINT_NAME, load_checkpoint

    state_dir = p.parent if p.is_file() and p.name == CHECKPOINT_NAME else p
    ckpt = load_checkpoint(state_dir)
    if ckpt is None:
        raise FileNotFoundError(f"--trained {path}: no .npz and no {CHECKPOINT_NAME} there")
    return ckpt.best_weights_numpy() or ckpt.weights_numpy()


def build_attacked_model(cfg: AttackConfig) -> torch.nn.Module:
    from node.training.model import build_model
    from node.training.weights import set_weights

    model = build_model(cfg.arch, cfg.defense, image_size=28, seed=cfg.seed, norm=cfg.norm)
    if cfg.trained:
        weights = load_trained_weights(cfg.trained)
        batch_norm = any(k.endswith("running_mean") for k in weights)
        if batch_norm != (cfg.norm == "batch"):
            trained_norm = "batch" if batch_norm else "group or none"
            raise ValueError(
                f"--trained {cfg.trained}: weights of a {trained_norm}-norm model, but "
                f"--norm is {cfg.norm}; pass the norm it was trained with"
            )
        set_weights(model, weights)
    return model


def make_attack(cfg: AttackConfig):  # -> GradientAttack
    from node.training.model import PIXEL_MEAN, PIXEL_STD

    options: dict[str, Any] = {
        "iterations": cfg.effective_iterations,
        "restarts": cfg.restarts,
        "bottleneck": cfg.bottleneck,
        "contrast": (PIXEL_MEAN, PIXEL_STD) if cfg.contrast_blind else None,
    }
    if cfg.attack in ("ig", "adaptive"):
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


def _observe_group(
    cfg: AttackConfig, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, group: int
):
    if cfg.threat == "single":
        return observe(model, x, y, kl_weight=cfg.kl_beta, generator_seed=cfg.seed * 100003 + group)
    return observe(
        model,
        x,
        y,
        envoys=cfg.envoys if cfg.threat == "aggregate" else 1,
        local_steps=cfg.local_steps if cfg.threat in ("fedavg", "aggregate") else 0,
        lr=cfg.local_lr,
        batch_size=cfg.local_batch,
        kl_weight=cfg.kl_beta,
        generator_seed=cfg.seed * 100003 + group,
    )


def attack_groups(
    cfg: AttackConfig,
    xs: Sequence[np.ndarray],
    ys: Sequence[np.ndarray],
    groups: Sequence[int],
    progress: Callable[[AttackProgress], None] | None = None,
) -> list[dict[str, Any]]:
    """Observe each victim group's update and attack them all (one batched run where the
    attack supports it); returns plain arrays, so it also runs in a worker process."""
    torch.set_num_threads(1)
    model = build_attacked_model(cfg)
    observations = [
        _observe_group(cfg, model, torch.from_numpy(x), torch.from_numpy(y), g)
        for x, y, g in zip(xs, ys, groups, strict=True)
    ]
    attack = make_attack(cfg)
    every = max(1, cfg.effective_iterations // max(1, cfg.frames))
    per = xs[0].shape[0]
    snapshots: dict[tuple[int, int], list[np.ndarray]] = {}

    def on_progress(p: AttackProgress) -> None:
        imgs = p.images.numpy()
        for j, v in enumerate(p.victims):
            snapshots.setdefault((p.trial, v), []).append(imgs[j * per : (j + 1) * per])
        if progress is not None:
            progress(p)

    results = attack.reconstruct_many(
        model,
        observations,
        tuple(xs[0].shape[1:]),
        progress=on_progress,
        progress_every=every,
        seeds=[cfg.seed * 7919 + g for g in groups],
    )
    out = []
    for v, res in enumerate(results):
        best_trial = _best_trial(res.trial_losses)
        out.append(
            {
                "images": res.images.numpy(),
                "labels": res.labels.numpy(),
                "loss": res.loss,
                "trial_losses": res.trial_losses,
                "frames": snapshots.get((best_trial, v), []),
                "matched_parameters": res.matched_parameters,
            }
        )
    return out


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


def run(cfg: AttackConfig) -> dict[str, Any]:
    """Run the whole experiment and write its files; returns the results dict."""
    cfg.validate()
    started = time.monotonic()
    data = load_data(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    per = cfg.victims_per_attack
    xs = [data.victims[i : i + per] for i in range(0, cfg.images, per)]
    ys = [data.labels[i : i + per] for i in range(0, cfg.images, per)]
    iterations = cfg.effective_iterations
    bar = progress_display(
        iterations * cfg.restarts, desc=f"{cfg.attack} vs {cfg.defense}", quiet=cfg.quiet
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
    if cfg.contrast_blind and cfg.contrast_prior == "neighbours":
        choose_contrast(results, data)
    report = score(cfg, data, results, time.monotonic() - started)
    # CPU seconds, this process and its workers: on a shared machine the wall time says
    # more about the neighbours than about the attack.
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    report["summary"]["cpu_seconds"] = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    write_outputs(out, cfg, data, results, report)
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


def score(
    cfg: AttackConfig, data: Data, results: list[dict[str, Any]], seconds: float
) -> dict[str, Any]:
    per = cfg.victims_per_attack
    originals = torch.from_numpy(data.victims)
    recs, rec_labels = [], []
    for g, res in enumerate(results):
        rec = torch.from_numpy(res["images"]).clamp(0, 1)
        perm = match_reconstructions(rec, originals[g * per : (g + 1) * per])
        recs.append(rec[perm])
        rec_labels.append(torch.from_numpy(res["labels"]))
    rec_all = torch.cat(recs)
    p, s, e = psnr(rec_all, originals), ssim(rec_all, originals), mse(rec_all, originals)
    nearest = identify(rec_all, torch.from_numpy(data.candidates))
    identified = is_identified(
        rec_all, torch.from_numpy(data.candidates), torch.from_numpy(data.indices)
    )
    base = baseline_psnr(torch.from_numpy(data.mean_image), originals)
    label_acc = [
        label_accuracy(rec_labels[g], data.labels[g * per : (g + 1) * per])
        for g in range(len(results))
    ]
    images = []
    for i in range(cfg.images):
        g = i // per
        images.append(
            {
                "index": int(data.indices[i]),
                "label": int(data.labels[i]),
                "group": g,
                "mse": float(e[i]),
                "psnr": float(p[i]),
                "ssim": float(s[i]),
                "identified": bool(identified[i]),
                "nearest": int(nearest[i]),
                "baseline_psnr": float(base[i]),
            }
        )
    for g, res in enumerate(results):
        for j, i in enumerate(range(g * per, (g + 1) * per)):
            images[i]["recovered_label_in_group"] = int(res["labels"][j])
    k = int(identified.sum())
    pval = chance_p_value(k, cfg.images, len(data.candidates))
    summary = {
        "images": cfg.images,
        "psnr": float(p.mean()),
        "psnr_median": float(p.median()),
        "ssim": float(s.mean()),
        "mse": float(e.mean()),
        "identified": k / cfg.images,
        "identified_count": k,
        "chance": 1.0 / len(data.candidates),
        "chance_p_value": pval,
        "at_chance": pval >= CHANCE_ALPHA,
        "baseline_psnr": float(base.mean()),
        "below_baseline": float(p.mean()) < float(base.mean()),
        "label_accuracy": float(np.mean(label_acc)),
        "seconds": seconds,
        "iterations": cfg.effective_iterations,
        "restarts": cfg.restarts,
        "smooth_relu": cfg.effective_smooth_relu,
        "matched_parameters": results[0]["matched_parameters"] if results else [],
    }
    config = {k2: v for k2, v in asdict(cfg).items() if k2 not in ("quiet",)}
    config["pool"] = data.source
    config["decision_rule"] = (
        f"identification is at chance when the one-sided binomial p-value of identifying at "
        f"least the observed count by uniform guessing among {len(data.candidates)} "
        f"candidates is >= {CHANCE_ALPHA}"
    )
    return {"config": config, "images": images, "summary": summary}


def write_outputs(
    out: Path, cfg: AttackConfig, data: Data, results: list[dict[str, Any]], report: dict[str, Any]
) -> None:
    per = cfg.victims_per_attack
    originals = torch.from_numpy(data.victims)
    rec_all = []
    for g, res in enumerate(results):
        rec = torch.from_numpy(res["images"]).clamp(0, 1)
        rec_all.append(rec[match_reconstructions(rec, originals[g * per : (g + 1) * per])])
    recs = torch.cat(rec_all)
    images = report["images"]
    summ = report["summary"]
    title = (
        f"{cfg.attack} vs {cfg.defense} ({cfg.threat}, batch {cfg.batch}): "
        f"PSNR {summ['psnr']:.1f} dB, identified {summ['identified_count']}/{cfg.images}, "
        f"baseline {summ['baseline_psnr']:.1f} dB"
    )
    save_grid(
        out / "grid.png",
        originals,
        recs,
        psnr=[im["psnr"] for im in images],
        ssim=[im["ssim"] for im in images],
        title=title,
    )
    n_frames = min((len(r["frames"]) for r in results), default=0)
    if n_frames:
        frames = []
        for f in range(n_frames):
            frame = torch.cat(
                [
                    torch.from_numpy(r["frames"][f]).clamp(0, 1)[
                        match_reconstructions(
                            torch.from_numpy(r["images"]), originals[g * per : (g + 1) * per]
                        )
                    ]
                    for g, r in enumerate(results)
                ]
            )
            frames.append(frame)
        save_animation(out / "reconstruction.gif", frames, originals)
    tmp = out / f".results.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out / "results.json")


def parse_args(argv: Sequence[str] | None) -> AttackConfig:
    ap = argparse.ArgumentParser(
        prog="fedbus attack",
        description="Gradient-inversion attack on the federation's model: reconstruct victims' "
        "X-rays from their updates and score the reconstructions.",
    )
    ap.add_argument("--defense", choices=DEFENSES, default="cvb")
    ap.add_argument("--attack", choices=ATTACK_NAMES, default="ig")
    ap.add_argument("--images", type=int, default=16, help="number of victims (default 16)")
    ap.add_argument(
        "--out", default=None, help="output folder (default runs/attack-DEFENSE-ATTACK)"
    )
    ap.add_argument("--data", default=None, help="PneumoniaMNIST npz/folder, or a Kermany folder")
    ap.add_argument("--source", choices=("pneumoniamnist", "kermany"), default="pneumoniamnist")
    ap.add_argument("--trained", default=None, help="weights: .npz, or a director state folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iterations", type=int, default=None, help="attack iterations per restart")
    ap.add_argument("--restarts", type=int, default=1)
    ap.add_argument("--threat", choices=THREATS, default="single")
    ap.add_argument("--batch", type=int, default=1, help="images per envoy update")
    ap.add_argument("--envoys", type=int, default=4, help="envoys in a secure aggregate")
    ap.add_argument("--local-steps", type=int, default=4, help="FedAvg local SGD steps")
    ap.add_argument("--local-lr", type=float, default=0.05)
    ap.add_argument("--local-batch", type=int, default=None, help="FedAvg local batch size")
    ap.add_argument("--kl-beta", type=float, default=0.0, help="the plan's KL weight")
    ap.add_argument("--tv", type=float, default=None, help="total-variation weight (IG)")
    ap.add_argument("--lr", type=float, default=None, help="attack step size")
    ap.add_argument(
        "--smooth-relu",
        type=float,
        default=None,
        metavar="BETA",
        help=f"IG/adaptive: optimise through Softplus(BETA) in place of ReLU (default "
        f"{SMOOTH_RELU:g}; 0 = the exact ReLU, as in the papers)",
    )
    ap.add_argument("--arch", choices=("cnn", "resnet18"), default="cnn")
    ap.add_argument(
        "--norm",
        choices=("batch", "group", "none"),
        default="group",
        help="the model's normalisation (default group; batch, the federation's, resists "
        "every attack here even undefended, see benchmarks/leakage)",
    )
    ap.add_argument("--bottleneck", choices=("mean", "sample"), default="mean")
    ap.add_argument(
        "--contrast-prior",
        choices=CONTRAST_PRIORS,
        default="neighbours",
        help="how the attacker picks the contrast no gradient can tell: that of the nearest "
        "training X-rays (default) or the population's pixel RMS",
    )
    ap.add_argument("--workers", type=int, default=1, help="attack processes in parallel")
    ap.add_argument(
        "--parameters",
        default=None,
        help="comma list of parameter names whose updates IG matches (a control for the "
        "adaptive attack: e.g. conv1.weight on the undefended model)",
    )
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    return AttackConfig(
        defense=a.defense,
        attack=a.attack,
        images=a.images,
        out=a.out or f"runs/attack-{a.defense}-{a.attack}",
        data=a.data,
        source=a.source,
        trained=a.trained,
        seed=a.seed,
        iterations=a.iterations,
        restarts=a.restarts,
        threat=a.threat,
        batch=a.batch,
        envoys=a.envoys,
        local_steps=a.local_steps,
        local_lr=a.local_lr,
        local_batch=a.local_batch,
        kl_beta=a.kl_beta,
        tv=a.tv,
        lr=a.lr,
        smooth_relu=a.smooth_relu,
        arch=a.arch,
        norm=a.norm,
        bottleneck=a.bottleneck,
        contrast_prior=a.contrast_prior,
        workers=a.workers,
        quiet=a.quiet,
        extra={"parameters": a.parameters.split(",")} if a.parameters else {},
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        report = run(cfg)
    except FedbusError as exc:  # DataUnavailable: exit status 3
        print(f"fedbus attack: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except (ValueError, FileNotFoundError) as exc:
        print(f"fedbus attack: {exc}", file=sys.stderr)
        return int(ExitCode.USAGE)
    s = report["summary"]
    print(
        f"{cfg.attack} vs {cfg.defense}: PSNR {s['psnr']:.2f} dB (baseline {s['baseline_psnr']:.2f}), "
        f"SSIM {s['ssim']:.3f}, identified {s['identified_count']}/{s['images']} "
        f"(chance {s['chance']:.4f}, p={s['chance_p_value']:.3g}), "
        f"labels {100 * s['label_accuracy']:.0f}%, {s['seconds']:.0f} s -> {cfg.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
